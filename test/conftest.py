"""Shared fixtures: real clips and stills, and short real access-unit lists.

The data lives in ``../shared/data`` (next to the repo root, ``$CVSEG_SHARED_DATA`` elsewhere) and
is never copied into the repo. Without its ``clips`` folder the clip constants below name clips
built once from Debian's ``opencv-doc`` sample ``vtest.avi`` (a real street scene, fetched by
:func:`cvseg_ros.tools.demo.fetch_vtest`) into the user's cache; tests that need what only the shared
data holds (CamVid's labels, the teachers) skip with the reason when it is absent, as do the clip
tests when the sample cannot be fetched.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from cvseg_ros.common.paths import cache_dir, shared_data_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = shared_data_dir()
SHARED_CLIPS = SHARED_DATA / "clips"
CAMVID_TRAIN = SHARED_DATA / "camvid" / "train"
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".h264")


@dataclass(frozen=True)
class Recipe:
    """A clip cut from ``vtest.avi`` (768x576, 10 fps): every ``step``-th frame from ``start``, the
    middle 768x432 (16:9) resized to ``size``, encoded with ``codec`` (H.264 I/P: GOP ``gop``)."""
    start: int
    count: int
    size: tuple[int, int]
    gop: int = 12
    step: int = 3          # a fixed camera at 10 fps moves little from frame to frame
    codec: str = "h264"


#: the clips built from vtest.avi, in place of the shared ones of the same role
FALLBACK_RECIPES = {
    "vtest_960x540_gop30.mp4": Recipe(0, 90, (960, 540), gop=30),      # as udacity_solidWhiteRight
    "vtest_640x360.mp4": Recipe(270, 48, (640, 360), gop=30),          # as udacity_test_video
    "vtest_768x432.mp4": Recipe(420, 64, (768, 432), gop=30),          # as udacity_test_small1
    "vtest_mpeg4.mp4": Recipe(600, 48, (768, 432), codec="mpeg4"),     # as udacity_project_video_cut
}
FALLBACK_STILL = "vtest_still_480x360.png"   # frame 0, whole, resized: in place of a CamVid still
FALLBACK_DIR = cache_dir() / "test-clips" / (
    "vtest-" + hashlib.sha1(repr(sorted(FALLBACK_RECIPES.items())).encode()).hexdigest()[:10])
SHARED = SHARED_CLIPS.is_dir()
CLIPS_DIR = SHARED_CLIPS if SHARED else FALLBACK_DIR


def _clip(shared: str, fallback: str) -> Path:
    return SHARED_CLIPS / shared if SHARED else FALLBACK_DIR / fallback


MPEG4_CLIP = _clip("udacity_project_video_cut.mp4", "vtest_mpeg4.mp4")   # MPEG-4 Part 2: must be refused
FUZZ_CLIP = _clip("udacity_solidWhiteRight.mp4", "vtest_960x540_gop30.mp4")   # 960x540, GOP 30, I/P
SMALL_CLIP = _clip("udacity_test_video.mp4", "vtest_640x360.mp4")        # 1280x720 (640x360), 38 (48) frames
SMALL1_CLIP = _clip("udacity_test_small1.mp4", "vtest_768x432.mp4")   # 1280x720 (768x432), 88 (64) frames


# -- the fallback clips -----------------------------------------------------------------------------

def _vtest_frames(recipe: Recipe, vtest: Path):
    import cv2

    from cvseg_ros.codec.video import read_frames
    stop = recipe.start + recipe.count * recipe.step
    for rgb in itertools.islice(read_frames(vtest), recipe.start, stop, recipe.step):
        top = (rgb.shape[0] - rgb.shape[1] * 9 // 16) // 2
        crop = rgb[top: rgb.shape[0] - top]
        yield crop if crop.shape[1::-1] == recipe.size else cv2.resize(crop, recipe.size,
                                                                      interpolation=cv2.INTER_AREA)


def _write_mpeg4(frames, dst: Path, fps: float) -> None:
    """MPEG-4 Part 2 (FFmpeg's ``mpeg4`` encoder) in an MP4 container."""
    from fractions import Fraction

    with av.open(str(dst), "w") as out:
        stream = None
        for rgb in frames:
            if stream is None:
                stream = out.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1001))
                stream.width, stream.height, stream.pix_fmt = rgb.shape[1], rgb.shape[0], "yuv420p"
                stream.bit_rate = 3_000_000
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode(None))


def _build_clip(recipe: Recipe, vtest: Path, dst: Path) -> None:
    """Encode one recipe with the project's own encoder: the cut frames to H.264 (nearly lossless),
    then :func:`transcode` to an MP4 with the recipe's GOP (or to MPEG-4 Part 2)."""
    from cvseg_ros.codec.video import encode_frames, transcode, write_h264
    fps = 10.0 / recipe.step
    tmp = dst.with_name(dst.stem + ".tmp.mp4")
    if recipe.codec == "mpeg4":
        _write_mpeg4(_vtest_frames(recipe, vtest), tmp, fps)
    else:
        raw = dst.with_name(dst.stem + ".tmp.h264")
        write_h264(raw, encode_frames(_vtest_frames(recipe, vtest), fps=fps, gop=recipe.gop, crf=10))
        transcode(raw, tmp, gop=recipe.gop, fps=fps)
        raw.unlink()
    tmp.replace(dst)


def _write_still(vtest: Path, dst: Path) -> None:
    import cv2

    from cvseg_ros.codec.video import read_frames
    rgb = cv2.resize(next(read_frames(vtest)), (480, 360), interpolation=cv2.INTER_AREA)
    tmp = dst.with_name(dst.stem + ".tmp.png")
    assert cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), tmp
    tmp.replace(dst)


@functools.lru_cache(maxsize=None)
def fallback_clips() -> str | None:
    """Fetch ``vtest.avi`` (which ``cvseg fuzz`` and ``soak`` then take by default) and build the
    fallback clips in :data:`FALLBACK_DIR` unless they are there (once per machine, under a file
    lock); ``None`` when they are ready, else why they could not be made."""
    try:
        FALLBACK_DIR.mkdir(parents=True, exist_ok=True)
        with open(FALLBACK_DIR.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            from cvseg_ros.tools.demo import fetch_vtest
            vtest = fetch_vtest(cache_dir())
            for name, recipe in FALLBACK_RECIPES.items():
                if not (FALLBACK_DIR / name).is_file():
                    _build_clip(recipe, vtest, FALLBACK_DIR / name)
            if not (FALLBACK_DIR / FALLBACK_STILL).is_file():
                _write_still(vtest, FALLBACK_DIR / FALLBACK_STILL)
    except Exception as exc:  # noqa: BLE001 - any failure (no network, no apt-get) means: skip
        return f"{type(exc).__name__}: {exc}"
    return None


def _fallback_missing() -> str:
    return (f"no {SHARED_CLIPS} (../shared/data beside the repo root), and the fallback clips from "
            f"Debian's opencv-doc vtest.avi could not be made: {fallback_clips()}")


def require(path: Path, what: str = "real data") -> Path:
    """Skip the calling test (with the reason) unless ``path`` exists; a fallback clip is built
    first when needed."""
    if not path.exists() and (path == FALLBACK_DIR or FALLBACK_DIR in path.parents):
        if fallback_clips() is not None:
            pytest.skip(f"{what} absent: {_fallback_missing()}")
    if not path.exists():
        pytest.skip(f"{what} absent: needs {path} (../shared/data beside the repo root)")
    return path


class Units(list):
    """A list of access units whose repr stays short (hypothesis prints the test's arguments)."""

    def __init__(self, units, source: str) -> None:
        super().__init__(units)
        self.source = source

    def __repr__(self) -> str:
        return f"<{len(self)} access units of {self.source}>"


def codec_of(path: Path) -> str:
    with av.open(str(path)) as container:
        return container.streams.video[0].codec_context.name


def _video_files() -> list[Path]:
    if not SHARED and fallback_clips() is not None:
        return []
    if not CLIPS_DIR.is_dir():
        return []
    return sorted(p for p in CLIPS_DIR.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)


def h264_clips() -> list[Path]:
    """Every H.264 clip in :data:`CLIPS_DIR` (empty when there is none)."""
    return [p for p in _video_files() if codec_of(p) == "h264"]


def _no_clips() -> str:
    if not SHARED and fallback_clips() is not None:
        return f"real clips absent: {_fallback_missing()}"
    return f"real data absent: no H.264 clip in {CLIPS_DIR} (../shared/data beside the repo root)"


def clip_params():
    """``pytest.mark.parametrize`` values: one per H.264 clip, or one skipped placeholder."""
    clips = h264_clips()
    if clips:
        return [pytest.param(p, id=p.stem) for p in clips]
    return [pytest.param(None, id="no-clips", marks=pytest.mark.skip(reason=_no_clips()))]


def accounted(stats) -> int:
    """Access units the counters account for (each unit lands in exactly one of them)."""
    return stats.accounted()


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
        pytest.skip(_no_clips())
    return found


@pytest.fixture(scope="session")
def clip_units() -> Units:
    """A short real access-unit list: IDR (with SPS/PPS) + 15 P-frames of :data:`FUZZ_CLIP` (960x540)."""
    from cvseg_ros.codec.video import read_access_units

    require(FUZZ_CLIP, "real clip")
    units = Units((u.data for u in itertools.islice(read_access_units(FUZZ_CLIP), 16)), FUZZ_CLIP.name)
    assert len(units) == 16
    return units


@pytest.fixture(scope="session")
def gop12_units() -> Units:
    """36 real frames of :data:`SMALL_CLIP` at 320x180 encoded by :func:`video.encode_frames` with GOP 12."""
    from cvseg_ros.codec.video import encode_frames

    require(SMALL_CLIP, "real clip")
    units = Units(encode_frames(read_rgb(SMALL_CLIP, 36, (320, 180)), gop=12), f"{SMALL_CLIP.name} at 320x180")
    assert len(units) == 36
    return units


@pytest.fixture(scope="session")
def b_frame_units() -> tuple[Units, list[int]]:
    """The frames of :data:`gop12_units` encoded with 2 B-frames between the I/P pictures
    (x264's B-pyramid): the units in decoding order and each one's display index."""
    from cvseg_ros.codec.video import encode_frames

    require(SMALL_CLIP, "real clip")
    presentation: list[int] = []
    units = Units(encode_frames(read_rgb(SMALL_CLIP, 36, (320, 180)), gop=12, bframes=2, presentation=presentation),
                  f"{SMALL_CLIP.name} at 320x180 with B-frames")
    assert len(units) == 36 and sorted(presentation) == list(range(36))
    return units, presentation


@pytest.fixture(scope="session")
def camvid_image() -> np.ndarray:
    """A real textured street image, 480x360 RGB: a CamVid still, else a frame of vtest.avi."""
    import cv2

    if CAMVID_TRAIN.is_dir():
        files = sorted(CAMVID_TRAIN.glob("*.png"))
        if not files:
            pytest.skip(f"real data absent: no PNG in {CAMVID_TRAIN}")
    else:
        files = [require(FALLBACK_DIR / FALLBACK_STILL, "a real street image")]
    bgr = cv2.imread(str(files[0]), cv2.IMREAD_COLOR)
    assert bgr is not None, files[0]
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# -- a real CamVid still under camera motion ----------------------------------------------------------

def moving_still(index: int, seed: int, count: int, gop: int = 4) -> list[bytes]:
    """CamVid train still number ``index`` seen by a camera moving at random (``seed``), ``count``
    frames encoded with GOP ``gop``; without the shared data, a still of the fallback footage."""
    from cvseg_ros.codec.video import encode_frames
    from cvseg_ros.training.data import read_label, read_rgb, synthetic_sequence
    if CAMVID_TRAIN.is_dir():
        image = sorted(CAMVID_TRAIN.glob("*.png"))[index]
        label = read_label(CAMVID_TRAIN.parent / "trainannot" / image.name)
    else:   # the labels only travel with the frames: any real street image will do
        image = require(FALLBACK_DIR / FALLBACK_STILL, "a real street image")
        label = np.zeros((360, 480), np.uint8)
    frames, _ = synthetic_sequence(read_rgb(image), label, np.random.default_rng(seed), count)
    return encode_frames(frames, gop=gop)


@pytest.fixture(scope="session")
def real_units():
    """:func:`moving_still`: six frames, GOP 4."""
    return moving_still(0, 1, 6)


CAMVID_VAL = SHARED_DATA / "camvid" / "val"


def street_frames(count: int) -> list[np.ndarray]:
    """The first ``count`` frames of the CamVid val sequence (480x360, a street with cyclists and
    cars); without the shared data, of :data:`SMALL_CLIP` resized to 480x360."""
    if CAMVID_VAL.is_dir():
        from cvseg_ros.training.data import read_rgb as read_still
        return [read_still(p) for p in sorted(CAMVID_VAL.glob("*.png"))[:count]]
    return read_rgb(require(SMALL_CLIP, "a real clip"), count, (480, 360))


def decode(units, residual_stride: int) -> list:
    """Access units through our reader, the residual at 1/``residual_stride`` of the frame."""
    from cvseg_ros.codec.decoder import H264StreamDecoder
    decoder = H264StreamDecoder("test", residual_size=lambda h, w: (h // residual_stride, w // residual_stride))
    return [f for u in units for f in decoder.feed(u)]


@pytest.fixture(scope="session")
def real_frames(real_units):
    """``real_units`` decoded by our reader (the residual at half size, as the configurations take it)."""
    from cvseg_ros.training.data import RESIDUAL_STRIDE
    return decode(real_units, RESIDUAL_STRIDE)


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
def one_torch_thread():
    """One torch thread for a module's tests (steadier on a shared 2-core machine); put back after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def restore_threads():
    """Commands run with `--threads 1` set process-wide torch/OpenCV values: put them back."""
    import cv2
    import torch

    torch_threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    yield
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(cv_threads)
