"""The masks a processed message yields, checked, each under the header of the message its picture
was coded in: its own, or a held one's (a B-frame stream gives pictures some messages later).
What got no mask is counted with its reason. ROS-free, used by :mod:`.message_path`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cvseg_ros.ros.policies import CameraState, QueuedFrame


@dataclass
class MaskOutput:
    """A mask ready to publish, with the header of the message its picture was coded in."""
    camera: str
    header: Any
    stamp_ns: int
    mask: np.ndarray          # HxW uint8 class ids, the decoded frame's size
    network: str              # "i_frame" / "p_frame" / "copy"
    kind: str                 # "I" / "P" / "B"
    reset: bool               # the model state (re)started on this frame
    received_ns: int
    stamp_epoch: int = 0      # stamp resets counted before it: within an epoch, stamps only increase


def masks_of(engine, cam: CameraState, item: QueuedFrame | None, before: dict, results: list) -> list[MaskOutput]:
    """The masks of ``item`` (None: no new message) and of the held messages whose pictures
    are in ``results``, each checked and under its own message's header; ``item`` held while
    the decoder holds its picture back; what got no mask counted."""
    outs, own = [], []
    for res in results:
        message = item if item is not None and res.stamp == item.stamp_ns else cam.held.pop(res.stamp, None)
        if message is item:
            own.append(res)
        elif message is None and res.stamp in cam.skipped_stamps:
            continue                # a queue-skipped message's picture (counted in queue_drops)
        elif message is None:           # a picture of a message whose outcome is counted already
            cam.count("extra_frames", error=f"a picture under stamp {res.stamp}, which is not the message's "
                                            f"{getattr(item, 'stamp_ns', None)} nor a held message's: not published")
        else:
            out = _checked(engine, cam, message, before, [res])
            if out is not None:
                outs.append(out)
    if item is not None and not own and item.stamp_ns in engine.held_stamps(cam.name):
        cam.held[item.stamp_ns] = item      # its picture comes out with a later message
    elif item is not None:
        out = _checked(engine, cam, item, before, own)
        if out is not None:
            outs.append(out)
    settle_held(engine, cam, "no_output", "the decoder gave no picture for a message it held back")
    return outs


def settle_held(engine, cam: CameraState, reason: str, error: str) -> None:
    """The held messages whose pictures the decoder no longer holds (they came out without a mask,
    or were lost): counted under ``reason``."""
    if cam.held:
        waiting = set(engine.held_stamps(cam.name))
        for stamp in [s for s in cam.held if s not in waiting]:
            del cam.held[stamp]
            cam.count(reason, error=error)


def _checked(engine, cam: CameraState, item: QueuedFrame, before: dict, results: list) -> MaskOutput | None:
    """The mask of ``item``, checked; or None with the reason counted."""
    if not results:
        after = engine.stats(cam.name)
        grew = {k: after.get(k, 0) - before.get(k, 0) for k in after if isinstance(after.get(k), int)}
        for stat, reason in (("skipped_before_keyframe", "skipped_before_keyframe"), ("over_limits", "over_limits"),
                             ("corrupt", "decode_errors"), ("no_output", "no_output")):
            if grew.get(stat, 0) > 0:
                error = after.get("last_error") if reason in ("decode_errors", "over_limits") else None
                cam.count(reason, error=error)
                return None
        cam.count("no_state", error=f"no mask for a decoded frame ({after.get('last_error', '')})")
        return None
    if len(results) > 1:     # one message decoded to several pictures: keep the newest
        cam.counts["extra_frames"] += len(results) - 1
    res = results[-1]
    mask = res.mask
    problem = None
    if res.stamp != item.stamp_ns:
        problem = f"mask stamp {res.stamp} is not the message's {item.stamp_ns}"
    elif not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.shape != (res.height, res.width):
        problem = (f"mask {getattr(mask, 'shape', None)} {getattr(mask, 'dtype', None)} does not match "
                   f"the decoded frame {res.width}x{res.height}")
    if problem:
        cam.count("bad_outputs", error=problem)
        engine.mark_discontinuity(cam.name, "bad output")
        return None
    return MaskOutput(cam.name, item.header, item.stamp_ns, mask, res.network, res.kind, res.reset,
                      item.received_ns, item.stamp_epoch)
