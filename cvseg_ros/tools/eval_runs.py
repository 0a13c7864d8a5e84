"""One method's passes over the evaluation stream (:mod:`.evaluate`): each access unit timed end
to end, its masks scored against the labels of the frames they belong to."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from cvseg_ros.common import stats, timing
from cvseg_ros.model.classes import CAMVID_CLASSES, NO_CLASS
from cvseg_ros.tools.metrics import SegmentationMetrics

CAMERA = "cam"


# -- running one method ---------------------------------------------------------------------------
@dataclass
class MethodRun:
    metrics: SegmentationMetrics
    times_ms: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    networks: dict[str, int] = field(default_factory=dict)
    missing: int = 0
    #: (times_ms, kinds) of the timing-only passes after the scored one
    more_passes: list[tuple[list[float], list[str]]] = field(default_factory=list)

    def summary(self) -> dict:
        m = self.metrics
        passes = [(self.times_ms, self.kinds)] + self.more_passes
        per_pass = [timing.ms_per_frame(t, k) for t, k in passes]
        medians = [timing.kind_medians(t, k) for t, k in passes]
        kinds = sorted({kind for m in medians for kind in m})
        by_kind = {kind: round(stats.median(m[kind] for m in medians if kind in m), 3) for kind in kinds}
        all_times = [ms for t, _ in passes for ms in t]
        return {
            "miou": m.miou(),
            "pixel_acc": m.pixel_accuracy(),
            "per_class_iou": m.per_class_iou(),
            "miou_by_gop_position": m.miou_by_gop_position(),
            "frames_by_gop_position": list(m.frames_by_position),
            "ms_per_frame": round(timing.median_over_passes(per_pass), 3),
            "ms_per_frame_passes": [round(w, 3) for w in per_pass],
            "ms_per_frame_median": round(stats.median(all_times), 3),
            "ms_per_frame_mean": stats.mean(all_times, 3),
            "ms_per_frame_by_kind": by_kind,
            "networks": dict(self.networks),
            "missing_masks": self.missing,
        }


# segment(stamp, unit) -> [(stamp, mask, gop_index, kind, network)]; unit None: the end of the stream
Segmenter = Callable[[int, bytes], list[tuple[int, np.ndarray, int, str, str]]]
WARMUP_UNITS = 2   # an I- and a P-frame, on a separate camera / decoder, before timing


def run_method(name: str, units: Sequence[bytes], labels: Sequence[np.ndarray], gop: int,
               segment: Segmenter, progress: bool = True, stamps: Sequence[int] | None = None) -> MethodRun:
    """Time ``segment`` per access unit and score its masks against ``labels`` (stamp = frame index
    in display order: ``stamps[i]`` for unit ``i``, default ``i``); then the end of the stream
    (``segment(-1, None)``: the pictures a B-frame stream's decoder holds back), not timed.

    A frame that gets no mask counts as all "no class" (wrong), at GOP position ``index % gop``;
    with ``stamps`` (a B-frame stream, whose P-frames' ``gop_index`` skips the B-frames) every
    frame is at that position.
    """
    from tqdm import tqdm

    run = MethodRun(SegmentationMetrics(len(CAMVID_CLASSES), gop))
    scored = [False] * len(labels)
    by_display = stamps is not None and list(stamps) != list(range(len(units)))
    stamps = range(len(units)) if stamps is None else stamps
    for i, unit in enumerate(tqdm(units, desc=f"{name:>16}", unit="frame", disable=not progress)):
        outputs = _timed(segment, stamps[i], unit, run.times_ms, run.kinds)
        if i == len(units) - 1:
            outputs = outputs + segment(-1, None)
        for stamp, mask, gop_index, _kind, network in outputs:
            if not (0 <= stamp < len(labels)) or scored[stamp]:
                raise RuntimeError(f"{name}: unexpected mask for frame {stamp}")
            run.metrics.update(labels[stamp], mask, stamp % gop if by_display else gop_index)
            run.networks[network] = run.networks.get(network, 0) + 1
            scored[stamp] = True
    for i, done in enumerate(scored):
        if not done:
            run.missing += 1
            run.metrics.update(labels[i], np.full_like(labels[i], NO_CLASS), i % gop)
    return run


def _timed(segment: Segmenter, i: int, unit: bytes, times_ms: list[float], kinds: list[str]):
    """``segment(i, unit)``, its wall time and frame kind appended to ``times_ms`` and ``kinds``."""
    outputs, ms = timing.timed(segment, i, unit)
    times_ms.append(ms)
    kinds.append(outputs[0][3] if outputs else "-")
    return outputs


def time_pass(segment: Segmenter, units: Sequence[bytes]) -> tuple[list[float], list[str]]:
    """One more pass over the stream, timed only (the masks were scored in the first pass; the
    first unit is an IDR, so the method restarts cleanly)."""
    times, kinds = [], []
    for i, unit in enumerate(units):
        _timed(segment, i, unit, times, kinds)
    segment(-1, None)
    return times, kinds


def engine_segmenter(engine, warmup: Sequence[bytes] = ()) -> Segmenter:
    for unit in warmup:   # lazy initialisation (kernels, allocations) is not part of the timing
        engine.process([("warmup", unit, -1)])

    def segment(i: int, unit: bytes | None):
        return [(r.stamp, r.mask, r.gop_index, r.kind, r.network)
                for r in (engine.process([(CAMERA, unit, i)]) if unit is not None else engine.flush(CAMERA))]
    return segment


def teacher_segmenter(teacher, warmup: Sequence[bytes] = ()) -> Segmenter:
    """Decode like the engine (same decoded pixels, RGB for P-frames too), teacher on every frame."""
    from cvseg_ros.codec.decoder import H264StreamDecoder

    warm = H264StreamDecoder("warmup", rgb_for_p_frames=True)
    for unit in warmup:
        for f in warm.feed(unit):
            teacher.predict_camvid(f.rgb)
    decoder = H264StreamDecoder(CAMERA, rgb_for_p_frames=True)

    def segment(i: int, unit: bytes | None):
        return [(f.stamp, teacher.predict_camvid(f.rgb), f.gop_index, f.kind, "teacher")
                for f in (decoder.feed(unit, i) if unit is not None else decoder.flush()) if f.rgb is not None]
    return segment
