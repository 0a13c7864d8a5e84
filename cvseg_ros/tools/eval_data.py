"""Frames for ``cvseg eval`` and ``cvseg heldout``: labelled stills (PNG or JPEG frames with CamVid
label PNGs) and the frames of a video file, each at its own size (cropped to even sides for
yuv420p)."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")


def frame_files(frames_dir: str | Path) -> list[Path]:
    """The PNG and JPEG files of a directory, sorted by name (= temporal order)."""
    return sorted(p for p in Path(frames_dir).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)


def load_labelled_frames(frames_dir: str | Path, labels_dir: str | Path, max_frames: int | None = None,
                         sequence: str = "") -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Sorted RGB frames (PNG or JPEG) and their label PNGs (the frame's name with ``.png``); only
    the frames whose names start with ``sequence`` when given. Returns (rgb, labels, names)."""
    import cv2

    from cvseg_ros.codec.video import even_size

    frames_dir, labels_dir = Path(frames_dir), Path(labels_dir)
    for d in (frames_dir, labels_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"no such directory: {d}")
    files = [f for f in frame_files(frames_dir) if f.name.startswith(sequence)]
    if max_frames is not None:
        if max_frames < 1:
            raise ValueError(f"--max-frames must be >= 1, got {max_frames}")
        files = files[:max_frames]
    if not files:
        raise FileNotFoundError(f"no PNG or JPEG frames in {frames_dir}"
                                + (f" whose names start with {sequence!r}" if sequence else ""))
    frames, labels = [], []
    for f in files:
        label_path = labels_dir / f"{f.stem}.png"
        if not label_path.is_file():
            raise FileNotFoundError(f"frame {f.name} has no label {label_path}")
        bgr = cv2.imread(str(f), cv2.IMREAD_COLOR)
        lab = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        if bgr is None or lab is None:
            raise ValueError(f"cannot read {f if bgr is None else label_path}")
        if lab.ndim != 2 or lab.dtype != np.uint8:
            raise ValueError(f"{label_path}: expected a single-channel 8-bit label image, "
                             f"got shape {lab.shape} {lab.dtype}")
        if lab.shape != bgr.shape[:2]:
            raise ValueError(f"{label_path} is {lab.shape[1]}x{lab.shape[0]}, "
                             f"frame {f.name} is {bgr.shape[1]}x{bgr.shape[0]}")
        rgb = even_size(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))   # yuv420p needs even sizes
        frames.append(np.ascontiguousarray(rgb))
        labels.append(np.ascontiguousarray(lab[: rgb.shape[0], : rgb.shape[1]]))
        if rgb.shape != frames[0].shape:
            raise ValueError(f"{f.name} is {rgb.shape[1]}x{rgb.shape[0]}, the first frame "
                             f"{frames[0].shape[1]}x{frames[0].shape[0]}: one stream needs one size")
    return frames, labels, [f.name for f in files]


def video_frames(path: str | Path, *, step: int = 1, start: int = 0, max_frames: int | None = None,
                 width: int = 0) -> tuple[list[np.ndarray], float]:
    """Every ``step``-th decoded frame of a video file from frame ``start`` (at most ``max_frames``),
    at its own size or resized to ``width`` (aspect kept); returns (frames, their frame rate)."""
    import av
    import cv2

    from cvseg_ros.codec.video import even_size, read_frames

    if step < 1 or start < 0:
        raise ValueError(f"step must be >= 1 and start >= 0, got {step}, {start}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such video: {path}")
    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
    fps = float(rate) / step if rate else 25.0 / step
    stop = None if max_frames is None else start + max_frames * step
    frames = []
    for rgb in itertools.islice(read_frames(path), start, stop, step):
        if width and rgb.shape[1] != width:
            height = round(rgb.shape[0] * width / rgb.shape[1])
            rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
        frames.append(np.ascontiguousarray(even_size(rgb)))
    if not frames:
        raise ValueError(f"{path}: no frames from frame {start}")
    return frames, fps
