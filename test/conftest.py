"""Shared fixtures: the real data beside the repository, and short real access-unit lists.

The data lives in ``../shared/data`` (next to the repo root) and is never copied into the repo;
tests that need it skip with the reason when it is absent.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import av
import numpy as np
import pytest

from cvseg_ros.common.paths import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = shared_data_dir()
CLIPS_DIR = SHARED_DATA / "clips"
CAMVID_TRAIN = SHARED_DATA / "camvid" / "train"
MPEG4_CLIP = CLIPS_DIR / "udacity_project_video_cut.mp4"   # MPEG-4 Part 2: must be refused
FUZZ_CLIP = CLIPS_DIR / "udacity_solidWhiteRight.mp4"       # 960x540, GOP 30, I/P
SMALL_CLIP = CLIPS_DIR / "udacity_test_video.mp4"           # 1280x720, 38 frames
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".h264")


class Units(list):
    """A list of access units whose repr stays short (hypothesis prints the test's arguments)."""

    def __init__(self, units, source: str) -> None:
        super().__init__(units)
        self.source = source

    def __repr__(self) -> str:
        return f"<{len(self)} access units of {self.source}>"


def require(path: Path, what: str = "real data") -> Path:
    """Skip the calling test (with the reason) unless ``path`` exists."""
    if not path.exists():
        pytest.skip(f"{what} absent: needs {path} (../shared/data beside the repo root)")
    return path


def codec_of(path: Path) -> str:
    with av.open(str(path)) as container:
        return container.streams.video[0].codec_context.name


def _video_files() -> list[Path]:
    if not CLIPS_DIR.is_dir():
        return []
    return sorted(p for p in CLIPS_DIR.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)


def h264_clips() -> list[Path]:
    """Every H.264 clip in ``../shared/data/clips`` (empty when the data is absent)."""
    return [p for p in _video_files() if codec_of(p) == "h264"]


def clip_params():
    """``pytest.mark.parametrize`` values: one per H.264 clip, or one skipped placeholder."""
    clips = h264_clips()
    if clips:
        return [pytest.param(p, id=p.stem) for p in clips]
    return [pytest.param(None, id="no-clips", marks=pytest.mark.skip(
        reason=f"real data absent: no H.264 clip in {CLIPS_DIR} (../shared/data beside the repo root)"))]


def accounted(stats) -> int:
    """Access units the counters account for (each unit lands in exactly one of them)."""
    return stats.frames + stats.skipped_before_keyframe + stats.corrupt + stats.no_output + stats.b_frames


def pyav_frame_count(path: Path) -> int:
    """Frames PyAV itself decodes from a file (the reference count)."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def read_rgb(path: Path, count: int, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """The first ``count`` decoded RGB frames of a clip, optionally resized to ``size`` = (w, h)."""
    import cv2

    from cvseg_ros.codec.video import read_frames

    frames = list(itertools.islice(read_frames(path), count))
    if size is not None:
        frames = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]
    return frames


@pytest.fixture(scope="session")
def clips() -> list[Path]:
    found = h264_clips()
    if not found:
        pytest.skip(f"real data absent: no H.264 clip in {CLIPS_DIR} (../shared/data beside the repo root)")
    return found


@pytest.fixture(scope="session")
def clip_units() -> Units:
    """A short real access-unit list: IDR (with SPS/PPS) + 15 P-frames of a 960x540 dashcam clip."""
    from cvseg_ros.codec.video import read_access_units

    require(FUZZ_CLIP, "real clip")
    units = Units((u.data for u in itertools.islice(read_access_units(FUZZ_CLIP), 16)), FUZZ_CLIP.name)
    assert len(units) == 16
    return units


@pytest.fixture(scope="session")
def gop12_units() -> Units:
    """36 real dashcam frames at 320x180 encoded by :func:`video.encode_frames` with GOP 12."""
    from cvseg_ros.codec.video import encode_frames

    require(SMALL_CLIP, "real clip")
    units = Units(encode_frames(read_rgb(SMALL_CLIP, 36, (320, 180)), gop=12), f"{SMALL_CLIP.name} at 320x180")
    assert len(units) == 36
    return units


@pytest.fixture(scope="session")
def camvid_image() -> np.ndarray:
    """A real textured street image (CamVid, 480x360 RGB)."""
    import cv2

    require(CAMVID_TRAIN, "CamVid")
    files = sorted(CAMVID_TRAIN.glob("*.png"))
    if not files:
        pytest.skip(f"real data absent: no PNG in {CAMVID_TRAIN}")
    bgr = cv2.imread(str(files[0]), cv2.IMREAD_COLOR)
    assert bgr is not None, files[0]
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="session")
def segmenter():
    """(model, metadata): the shipped checkpoint, else a seeded random model (what is under test is
    the I/O around it). Torch runs on one thread in the tests (2 shared cores)."""
    import torch

    from cvseg_ros.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
    torch.set_num_threads(1)
    if DEFAULT_CHECKPOINT.exists():
        return load_checkpoint(DEFAULT_CHECKPOINT)
    from cvseg_ros.model.classes import CAMVID_CLASSES, CAMVID_PALETTE
    from cvseg_ros.model.segmenter import CompressedSegmenter, make_config
    torch.manual_seed(0)
    model = CompressedSegmenter(make_config("improved")).eval()
    return model, {"classes": CAMVID_CLASSES, "palette": CAMVID_PALETTE.tolist(), "input_size": [360, 480]}


@pytest.fixture()
def make_engine(segmenter):
    """A factory of fresh :class:`SegmentationEngine` (own cameras and decoders) on the shared model."""
    from cvseg_ros.engine.pipeline import SegmentationEngine
    model, meta = segmenter
    return lambda **kw: SegmentationEngine(model=model, metadata=meta, device="cpu", **kw)


@pytest.fixture(scope="module")
def restore_threads():
    """Commands run with `--threads 1` set process-wide torch/OpenCV values: put them back."""
    import cv2
    import torch

    torch_threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    yield
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(cv_threads)
