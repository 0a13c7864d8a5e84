"""Training data: CamVid stills with human labels, and temporal groups of real H.264.

Temporal groups (one I-frame + P-frames, as the model sees a GOP) come from two sources:

* CamVid train stills given realistic camera motion (driving forward = zoom about a vanishing
  point, plus pan and a little roll); frames and labels are warped together;
* real dashcam clips, labelled by the ENet teacher.

Either way the frames are encoded with libx264 and decoded by our reader, so the motion vectors
and residuals are real encoder output.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from cvseg_ros.model.classes import CAMVID_VOID
from cvseg_ros.codec.decoder import H264StreamDecoder
from cvseg_ros.codec.video import encode_frames, read_frames

IGNORE = 255
#: dashcam clips that training leaves out by default: ``cvseg heldout`` scores on them
HELD_OUT_CLIPS = ("udacity_solidWhiteRight.mp4", "udacity_test_small2.mp4")


def read_rgb(path: str | Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_label(path: str | Path) -> np.ndarray:
    """CamVid label PNG -> uint8 ids with void (11) mapped to IGNORE (255)."""
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise FileNotFoundError(f"cannot read label {path}")
    lab = lab.astype(np.uint8)
    lab[lab >= CAMVID_VOID] = IGNORE
    return lab


def camvid_pairs(frames_dir: str | Path, labels_dir: str | Path) -> list[tuple[Path, Path]]:
    """Sorted (image, label) pairs matched by file name."""
    frames_dir, labels_dir = Path(frames_dir), Path(labels_dir)
    pairs = [(p, labels_dir / p.name) for p in sorted(frames_dir.glob("*.png"))]
    missing = [str(l) for _, l in pairs if not l.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} labels missing, e.g. {missing[0]}")
    if not pairs:
        raise FileNotFoundError(f"no PNG frames in {frames_dir}")
    return pairs


def load_camvid(frames_dir: str | Path, labels_dir: str | Path, limit: int | None = None,
                leave_out: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Images [N,H,W,3] uint8 and labels [N,H,W] uint8 (255 = ignore); without the stills of the
    sequences ``leave_out`` (name prefixes such as ``0006R0``)."""
    pairs = [p for p in camvid_pairs(frames_dir, labels_dir) if not p[0].name.startswith(tuple(leave_out))][:limit]
    if not pairs:
        raise FileNotFoundError(f"no stills in {frames_dir} but those of {list(leave_out)}")
    images = np.stack([read_rgb(i) for i, _ in pairs])
    labels = np.stack([read_label(l) for _, l in pairs])
    return images, labels


def files_digest(paths) -> str:
    """A short hash of file names and sizes (identifies a data set without reading it all)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(f"{p.name}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


# -- stills: augmentation for the I-frame network --------------------------------------------------
def random_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, size: tuple[int, int],
                scale: tuple[float, float] = (0.5, 1.75), soft: np.ndarray | None = None):
    """Random scale, crop (padded with ignore) and horizontal flip of a frame and its labels;
    ``soft`` (hxwxC float32 targets covering the frame at any resolution, padded with zeros) is
    resized to the scaled frame and goes along when given.
    Returns (image, label) or (image, label, soft)."""
    s = rng.uniform(*scale)
    h, w = label.shape
    nh, nw = max(8, int(h * s)), max(8, int(w * s))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)
    if soft is not None:
        soft = cv2.resize(soft, (nw, nh), interpolation=cv2.INTER_LINEAR)
    ch, cw = size
    if nh < ch or nw < cw:
        ph, pw = max(0, ch - nh), max(0, cw - nw)
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
        label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=IGNORE)
        if soft is not None:
            soft = np.pad(soft, ((0, ph), (0, pw), (0, 0)))
        nh, nw = label.shape
    y, x = rng.integers(0, nh - ch + 1), rng.integers(0, nw - cw + 1)
    image, label = image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
    soft = None if soft is None else soft[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
        soft = None if soft is None else soft[:, ::-1]
    out = np.ascontiguousarray(image), np.ascontiguousarray(label)
    return out if soft is None else (*out, np.ascontiguousarray(soft))


def h264_round_trip(images: np.ndarray, crfs: tuple[int, ...] = (18, 23, 28), seed: int = 0,
                    progress: bool = True) -> np.ndarray:
    """Each image encoded as an H.264 I-frame at a random CRF and decoded back.

    The network only ever sees decoded frames; the ENet teacher loses ~12 mIoU points on CRF-23
    frames, so the I-frame network is trained on both the originals and round-tripped copies.
    """
    from tqdm import tqdm
    rng = np.random.default_rng(seed)
    out = np.empty_like(images)
    for i, image in enumerate(tqdm(images, desc="H.264 round trip of the stills", disable=not progress)):
        units = encode_frames([image], gop=1, crf=int(rng.choice(crfs)))
        decoder = H264StreamDecoder("roundtrip")
        frames = [f for u in units for f in decoder.feed(u)]
        out[i] = frames[0].rgb if frames else image
    return out


# -- temporal groups ---------------------------------------------------------------------------
#: groups hold the residual at 1/RESIDUAL_STRIDE of the frame size, from P-frames decoded with
#: (DEBLOCK_P_FRAMES) or without H.264's deblocking filter: what the models' configurations take
#: (``ModelConfig.residual_stride``, ``ModelConfig.deblock_p_frames``)
RESIDUAL_STRIDE = 2
DEBLOCK_P_FRAMES = False

@dataclass
class Group:
    """One GOP as the model sees it: the I-frame image and, per P-frame, vectors and residual."""

    rgb: np.ndarray              # [H,W,3] uint8, the decoded I-frame
    motion_vectors: np.ndarray   # [T-1,2,H/4,W/4] float16
    residuals: np.ndarray        # [T-1,H/s,W/s] int16, s = RESIDUAL_STRIDE
    labels: np.ndarray           # [T,H,W] uint8 (255 = ignore), frame 0 = the I-frame
    intra: np.ndarray            # [T-1,H/4,W/4] bool, intra-coded cells
    luma: np.ndarray             # [T,H/4,W/4] uint8, each frame's mean luma per cell (frame 0 = the I-frame)

    @property
    def length(self) -> int:
        return len(self.labels)


def camera_motion(rng: np.random.Generator, length: int, height: int, width: int) -> list[np.ndarray]:
    """2x3 affine maps (output <- source) of a plausible vehicle-camera path over ``length`` frames.

    Forward motion zooms about a vanishing point; lateral pan, a little tilt and roll; all smooth.
    A base zoom keeps every output pixel inside the source image.
    """
    zoom_rate = rng.uniform(-0.004, 0.03)        # per frame, forward driving mostly
    pan = rng.normal(0, 1.5, 2)                  # px / frame
    roll = rng.normal(0, 0.15)                   # degrees / frame
    vanishing = np.array([width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.55)])
    base = 1.15 + max(0.0, -zoom_rate) * length
    maps = []
    for t in range(length):
        s = base * (1 + zoom_rate) ** t
        angle = roll * t
        m = cv2.getRotationMatrix2D(tuple(vanishing), angle, s)
        m[:, 2] += pan * t
        maps.append(m)
    return maps


def synthetic_sequence(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, length: int
                       ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Frames and labels of a still seen by a moving camera (labels warped with the frames)."""
    h, w = label.shape
    frames, labels = [], []
    for m in camera_motion(rng, length, h, w):
        frames.append(cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
        labels.append(cv2.warpAffine(label, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                                     borderValue=IGNORE))
    return frames, labels


def encode_group(frames: list[np.ndarray], labels: list[np.ndarray], fps: float = 15.0,
                 crf: int = 23) -> Group | None:
    """Encode frames as one GOP with libx264 and read it back with our reader."""
    units = encode_frames(frames, fps=fps, gop=len(frames), crf=crf)
    decoder = H264StreamDecoder("train", residual_size=lambda h, w: (h // RESIDUAL_STRIDE, w // RESIDUAL_STRIDE),
                                deblock_p_frames=DEBLOCK_P_FRAMES)
    decoded = [f for u in units for f in decoder.feed(u)]
    if len(decoded) != len(frames) or decoded[0].kind != "I" or any(f.kind != "P" for f in decoded[1:]):
        return None
    return Group(rgb=decoded[0].rgb,
                 motion_vectors=np.stack([f.motion_vectors for f in decoded[1:]]).astype(np.float16),
                 residuals=np.stack([f.residual for f in decoded[1:]]),
                 labels=np.stack(labels),
                 intra=np.stack([f.intra for f in decoded[1:]]),
                 luma=np.stack([f.luma_cells for f in decoded]))


def still_groups(images: np.ndarray, labels: np.ndarray, length: int, seed: int = 0,
                 progress: bool = True) -> list[Group]:
    from tqdm import tqdm
    rng = np.random.default_rng(seed)
    groups = []
    for image, label in tqdm(list(zip(images, labels)), desc="stills -> H.264 groups", disable=not progress):
        frames, labs = synthetic_sequence(image, label, rng, length)
        g = encode_group(frames, labs)
        if g is not None:
            groups.append(g)
    return groups


def fit_frame(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop to the aspect ratio of ``size`` (h, w), then resize to it."""
    h, w = rgb.shape[:2]
    th, tw = size
    if h * tw > w * th:   # too tall
        ch = w * th // tw
        y = (h - ch) // 2
        rgb = rgb[y:y + ch]
    else:
        cw = h * tw // th
        x = (w - cw) // 2
        rgb = rgb[:, x:x + cw]
    return cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_AREA)


def clip_groups(paths: list[Path], label_fn, length: int, size: tuple[int, int], frame_step: int = 1,
                stride: int | None = None, max_groups_per_clip: int = 0, progress: bool = True) -> list[Group]:
    """Groups of real clip frames (every ``frame_step``-th frame), labelled by ``label_fn(rgb)``."""
    from tqdm import tqdm
    span = length * frame_step
    stride = stride or span
    groups = []
    for path in paths:
        frames = [fit_frame(f, size) for f in read_frames(path)]
        starts = list(range(0, len(frames) - span + 1, stride))
        if max_groups_per_clip:
            starts = starts[:max_groups_per_clip]
        for s in tqdm(starts, desc=f"{Path(path).name} -> pseudo-labelled groups", disable=not progress):
            seq = frames[s:s + span:frame_step]
            g = encode_group(seq, [label_fn(f) for f in seq])
            if g is not None:
                groups.append(g)
    return groups
