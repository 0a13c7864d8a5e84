"""``cvseg fuzz``: mutated access units of real clips through the node's message path (reader included).

Each *episode* continues the same camera: a window of clean access units of a real clip is
mutated (bit flips, truncation, duplication, reordering, losses, random bytes, empty messages,
wrong ``format``, spliced / concatenated / foreign units, damaged or removed parameter sets, stamps
that go back, repeat or jump) and sent through :class:`~cvseg_ros.ros.message_path.MessagePath`
(sometimes in bursts that overflow the queue) as ``CompressedImage``, ``CompressedVideo`` or
``FFMPEGPacket`` messages (one type per episode); one source has B-frames, stamped as a camera
stamps them (their pictures' times, so they go back). Then a clean run starting at an IDR (of the
same clip, another clip, another resolution or another encoder, without B-frames: a camera
restart) is sent. Checked after every episode:

- nothing raised (``crashes``) and the engine never failed (``engine_errors``);
- every mask has the size of its decoded frame and the stamp of its own message; stamps of the
  masks never go back except at a counted stamp reset;
- every message is accounted for in the diagnostics: ``frames_in == masks_out + drop reasons``;
  the reader's counters account for every access unit it was given;
- recovery: the clean IDR gives a mask from the I-frame network with the state reset, at the clean
  clip's size, and every clean P-frame after it a mask;
- the reader alone: every H.264 message also goes to a bare reader (no message-path policy), which
  must never raise, account for every unit, and decode the clean run (an I-frame with the state
  reset at the IDR, then one frame per unit; at the IDR the pictures a B-frame window left held
  come out first).

The mutated units are counted (``mutated_units``): ``--iterations N`` runs episodes until N have
been sent. Deterministic for a ``--seed``. Exit status 1 on any failure (the first ones are
described in the JSON report).
"""
from __future__ import annotations

import functools
import json
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cvseg_ros.codec.decoder import accounted_units
from cvseg_ros.model.checkpoint import CHECKPOINT_HELP
from cvseg_ros.tools.mutations import (DEFAULT_CLIPS, FALLBACK_VIDEO, PERIOD_NS, START_NS, Msg, Source,
                                       default_videos, load_sources, mutate)

INPUT_TYPE_NAMES = ("compressed_image", "compressed_video", "ffmpeg_packet")


@functools.lru_cache(maxsize=1)
def _typestore():
    from cvseg_ros.ros.bags import typestore
    return typestore()


def as_input_type(kind: str, msg: Msg, frame_id: str):
    """``msg`` as a rosbags message of ``kind`` (:data:`INPUT_TYPE_NAMES`; its format as an
    FFMPEGPacket's encoding where the type has one)."""
    from cvseg_ros.ros.bags import h264_message
    return h264_message(_typestore(), kind, msg.data, msg.stamp_ns, frame_id, fmt=msg.fmt)


# -- the harness -----------------------------------------------------------------------------------

@dataclass
class FuzzReport:
    episodes: int = 0
    messages: int = 0
    mutated_units: int = 0
    clean_units: int = 0
    masks: int = 0
    crashes: int = 0
    engine_errors: int = 0
    bad_outputs: int = 0
    stale_outputs: int = 0
    accounting_failures: int = 0
    reader_accounting_failures: int = 0
    reader_crashes: int = 0
    reader_recovery_failures: int = 0
    recovered: int = 0
    recovery_failures: int = 0
    ops: dict = field(default_factory=dict)
    input_types: dict = field(default_factory=dict)   # episodes per input message type
    outcomes: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.crashes or self.engine_errors or self.bad_outputs or self.stale_outputs
                    or self.accounting_failures or self.reader_accounting_failures or self.recovery_failures
                    or self.reader_crashes or self.reader_recovery_failures)

    def fail(self, kind: str, detail: str) -> None:
        if len(self.failures) < 20:
            self.failures.append({"episode": self.episodes, "kind": kind, "detail": detail})

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["ok"] = self.ok
        d["wall_s"] = round(self.wall_s, 2)
        return d


class FuzzHarness:
    """One camera of a :class:`MessagePath` fed episode after episode (see the module doc); every
    H.264 message also goes to a bare reader (:class:`H264StreamDecoder`, no message-path policy)
    that must never raise, account for every unit and decode the clean run too."""

    def __init__(self, engine, sources: list[Source], camera: str = "fuzz", queue_depth: int = 3,
                 report: FuzzReport | None = None) -> None:
        from cvseg_ros.ros.message_path import MessagePath
        self.engine = engine
        self.sources = sources
        self.camera = camera
        from cvseg_ros.codec.decoder import H264StreamDecoder
        self.path = MessagePath(engine, [camera], queue_depth=queue_depth, batch_window_ms=0.0)
        self.reader = H264StreamDecoder(f"{camera}-reader")
        self.reader_out: list = []
        self.report = report or FuzzReport()
        self.clock = START_NS
        self.last_mask: tuple[int, int] | None = None     # (stamp, stamp epoch) of the last mask
        self.input_type = "compressed_image"

    # -- sending --------------------------------------------------------------------------------------
    def _send(self, msg: Msg, drain: bool = True) -> list:
        rep = self.report
        rep.messages += 1
        if msg.mutated:
            rep.mutated_units += 1
        else:
            rep.clean_units += 1
        from cvseg_ros.codec.annexb import is_h264_format
        self.reader_out = []
        if is_h264_format(msg.fmt):
            try:
                self.reader_out = self.reader.feed(msg.data, msg.stamp_ns)
            except Exception as exc:  # noqa: BLE001
                rep.reader_crashes += 1
                rep.fail("reader_crash", f"{msg.op or 'clean'}: {type(exc).__name__}: {exc}\n"
                                         f"{traceback.format_exc(limit=8)}")
        try:
            self.path.receive(self.camera, as_input_type(self.input_type, msg, self.camera))
            return self.drain() if drain else []
        except Exception as exc:  # noqa: BLE001 - this is what the fuzzer looks for
            rep.crashes += 1
            rep.fail("crash", f"{msg.op or 'clean'}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
            return []

    def drain(self) -> list:
        try:
            outs = self.path.drain()
        except Exception as exc:  # noqa: BLE001
            self.report.crashes += 1
            self.report.fail("crash", f"drain: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}")
            return []
        self._check_outputs(outs)
        return outs

    def _check_outputs(self, outs: list) -> None:
        rep = self.report
        rep.masks += len(outs)
        for out in outs:
            stamp = out.header.stamp.sec * 1_000_000_000 + out.header.stamp.nanosec
            if stamp != out.stamp_ns or out.mask.ndim != 2:
                rep.bad_outputs += 1
                rep.fail("bad_output", f"mask {out.mask.shape} stamp {out.stamp_ns} header {stamp}")
            if self.last_mask is not None and out.stamp_epoch == self.last_mask[1] \
                    and out.stamp_ns <= self.last_mask[0]:
                rep.stale_outputs += 1
                rep.fail("stale_output", f"mask stamp {out.stamp_ns} after {self.last_mask[0]} "
                                         f"without a stamp reset")
            self.last_mask = (out.stamp_ns, out.stamp_epoch)

    def _tick(self) -> int:
        self.clock += PERIOD_NS
        return self.clock

    # -- one episode ----------------------------------------------------------------------------------
    def episode(self, rng: random.Random, max_window: int = 8, max_tail: int = 6) -> bool:
        """Mutated window, then a clean run from an IDR; returns True when all checks held."""
        rep = self.report
        rep.episodes += 1
        before = dict(self.path.cameras[self.camera].counts)
        failures_before = len(rep.failures), rep.crashes, rep.bad_outputs, rep.stale_outputs
        self.input_type = rng.choice(INPUT_TYPE_NAMES)   # as CompressedImage, CompressedVideo or FFMPEGPacket
        rep.input_types[self.input_type] = rep.input_types.get(self.input_type, 0) + 1
        src = rng.choice(self.sources)
        start = rng.randrange(len(src.units))
        units = src.units[start: start + rng.randint(1, max_window)]
        if src.reorders:    # stamped as a camera stamps B-frames: each with its picture's time
            shown = src.presentation[start: start + len(units)]
            base = self.clock + PERIOD_NS * (1 - min(shown))
            window = [Msg(u, base + k * PERIOD_NS) for u, k in zip(units, shown)]
        else:
            window = [Msg(u, self._tick()) for u in units]
        for _ in range(rng.randint(1, len(window) + 1)):
            op = mutate(rng, window, self.sources)
            rep.ops[op] = rep.ops.get(op, 0) + 1
        self.clock = max([self.clock] + [m.stamp_ns for m in window if "stamp_far" not in m.op])
        burst = rng.random() < 0.2
        for msg in window:
            self._send(msg, drain=not burst)
        self.drain()
        # the clean run: from an IDR of some clip (a camera restart when it is another one)
        # (a source without B-frames: each clean unit's mask is checked as it is sent)
        clean = [s for s in self.sources if not s.reorders] or self.sources
        tail_src = rng.choice(clean)
        last = self.path.cameras[self.camera].last_data
        starts = [(tail_src, i) for i in tail_src.idr if tail_src.units[i] != last] or \
            [(s, i) for s in clean for i in s.idr if s.units[i] != last]
        tail_src, q = rng.choice(starts)     # (never the bytes just accepted: that is a duplicate)
        tail = tail_src.units[q: q + rng.randint(1, max_tail)]
        tail = tail[: next((k for k in range(1, len(tail)) if k + q in tail_src.idr), len(tail))]
        recovered = reader_ok = True
        for k, unit in enumerate(tail):
            stamp = self._tick()
            outs = self._send(Msg(unit, stamp))
            # the unit's own picture; at the IDR a reader left reordering by a B-frame window gives
            # out the pictures it held first, under their own (earlier) messages' stamps
            held, r = [f for f in self.reader_out if f.stamp != stamp], [f for f in self.reader_out if f.stamp == stamp]
            if reader_ok and (len(r) != 1 or (r[0].width, r[0].height) != (tail_src.width, tail_src.height)
                              or (k == 0 and not (r[0].kind == "I" and r[0].reset))
                              or (held and k > 0)):
                reader_ok = False
                rep.reader_recovery_failures += 1
                rep.fail("reader_recovery", f"bare reader on clean unit {k} of {tail_src.name}: "
                                            f"{[(f.kind, f.reset, f.width, f.height) for f in self.reader_out]}; "
                                            f"{self.reader.stats.last_error}")
            mine = [o for o in outs if o.stamp_ns == stamp]
            if len(mine) != 1:
                recovered = False
                cam = self.path.cameras[self.camera]
                rep.fail("recovery", f"clean unit {k} of {tail_src.name} at {q + k}: {len(mine)} mask(s); "
                                     f"last error: {cam.last_error}; reader: {self.engine.stats(self.camera)}")
                break
            o = mine[0]
            if o.mask.shape != (tail_src.height, tail_src.width) or \
                    (k == 0 and (o.network != "i_frame" or not o.reset)):
                recovered = False
                rep.fail("recovery", f"clean unit {k} of {tail_src.name}: mask {o.mask.shape} network "
                                     f"{o.network} reset {o.reset}, expected {tail_src.height}x{tail_src.width}")
                break
        if recovered:
            rep.recovered += 1
        else:
            rep.recovery_failures += 1
        self._check_accounting(before)
        return (len(rep.failures), rep.crashes, rep.bad_outputs, rep.stale_outputs) == failures_before \
            and recovered

    def _check_accounting(self, before: dict) -> None:
        rep = self.report
        level, message, values = self.path.camera_values(self.camera, 1.0)
        v = dict(values)
        from cvseg_ros.ros.message_path import DROP_REASONS
        drops = sum(int(v[k]) for k in DROP_REASONS)
        if int(v["frames_in"]) != (int(v["masks_out"]) + drops + int(v["queue_size"]) + int(v["in_flight"])
                                   + int(v["reorder_held"])):
            rep.accounting_failures += 1
            rep.fail("accounting", f"frames_in {v['frames_in']} != masks_out {v['masks_out']} + drops {drops} "
                                   f"+ queue {v['queue_size']} + held {v['reorder_held']}")
        counts = self.path.cameras[self.camera].counts
        rep.engine_errors += counts["engine_errors"] - before.get("engine_errors", 0)
        if counts["engine_errors"] > before.get("engine_errors", 0) or counts["bad_outputs"] > before.get("bad_outputs", 0):
            rep.fail("engine", f"engine_errors/bad_outputs grew: {self.path.cameras[self.camera].last_error}")
        rep.bad_outputs += counts["bad_outputs"] - before.get("bad_outputs", 0)
        for st in (self.engine.stats(self.camera), self.reader.stats.as_dict()):
            seen = accounted_units(st)
            if seen != st["access_units"]:
                rep.reader_accounting_failures += 1
                rep.fail("reader_accounting", f"reader accounts for {seen} of {st['access_units']} units: {st}")
        rep.outcomes = {k: int(v[k]) for k in ("frames_in", "masks_out", *DROP_REASONS, "lost_units",
                                                "stamp_gaps", "stamp_resets", "discontinuities", "resyncs",
                                                "resolution_changes", "queue_decode_only", "queue_discarded")}


def fuzz(iterations: int, *, videos: Sequence[str | Path] = (), seed: int = 0, width: int = 320,
         frames: int = 36, gop: int = 12, native: bool = True, queue_depth: int = 3,
         checkpoint: str | None = None, threads: int | None = 1, engine=None, sources=None,
         progress=None) -> FuzzReport:
    """Run episodes until ``iterations`` mutated access units have been sent; returns the report."""
    if iterations < 1:
        raise ValueError("--iterations must be >= 1")
    if sources is None:
        sources = load_sources(list(videos) or default_videos(), width=width, frames=frames, gop=gop,
                               native=native)
    if engine is None:
        from cvseg_ros.engine.pipeline import SegmentationEngine
        engine = SegmentationEngine(checkpoint=checkpoint, device="cpu", threads=threads)
    rng = random.Random(seed)
    harness = FuzzHarness(engine, sources, queue_depth=queue_depth)
    rep = harness.report
    t0 = time.perf_counter()
    next_progress = 1000
    while rep.mutated_units < iterations:
        harness.episode(rng)
        if progress is not None and rep.mutated_units >= next_progress:
            progress(f"fuzz: {rep.mutated_units} mutated units, {rep.episodes} episodes, crashes {rep.crashes}, "
                     f"recovered {rep.recovered}/{rep.episodes}, {time.perf_counter() - t0:.0f} s")
            next_progress += 1000
    rep.wall_s = time.perf_counter() - t0
    return rep


# -- CLI -------------------------------------------------------------------------------------------

def register(sub) -> None:
    p = sub.add_parser("fuzz", help="mutated access units of real clips through the node's message path")
    p.add_argument("--iterations", type=int, default=10_000, help="mutated access units to send")
    p.add_argument("--video", action="append", default=None,
                   help=f"real clip(s) to take access units from (default: every clip in {DEFAULT_CLIPS}, "
                        f"else {FALLBACK_VIDEO} if fetched)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=320, help="re-encode the clips at this width")
    p.add_argument("--frames", type=int, default=36, help="frames per clip")
    p.add_argument("--gop", type=int, default=12)
    p.add_argument("--no-native", dest="native", action="store_false",
                   help="leave out the first H.264 clip's own access units (full size, slower)")
    p.add_argument("--queue-depth", type=int, default=3)
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", dest="json_out")
    p.set_defaults(func=_main)


def _main(args) -> int:
    rep = fuzz(args.iterations, videos=args.video or (), seed=args.seed, width=args.width, frames=args.frames,
               gop=args.gop, native=args.native, queue_depth=args.queue_depth, checkpoint=args.checkpoint,
               threads=args.threads, progress=print)
    result = rep.as_dict()
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}, indent=2))
    for f in rep.failures[:5]:
        print(f"FAILURE (episode {f['episode']}, {f['kind']}): {f['detail']}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0 if rep.ok else 1
