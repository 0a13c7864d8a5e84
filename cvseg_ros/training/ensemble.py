"""The Cityscapes teachers as CamVid probabilities, and their ensemble.

Each teacher runs at its own input size (1024x512); its class probabilities are summed into the 11
CamVid classes (:data:`cvseg_ros.model.classes.CAMVID_CLASS_MAP`) and resized to the frame. What
mass is left is the teachers' "no CamVid class" (ENet's Unlabeled, ESPNetv2's background).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cvseg_ros.common.paths import shared_data_dir
from cvseg_ros.model.classes import CAMVID_CLASS_MAP, CAMVID_CLASSES

VOID = len(CAMVID_CLASSES)          # 11: not scored
ENET_FILE = Path("teacher") / "enet-cityscapes.net"
ESPNETV2_FILE = Path("teacher") / "espnetv2_s_2.0_city_1024x512.pth"


@dataclass(frozen=True)
class CamvidProbabilities:
    """A teacher: ``teacher(rgb)`` (HxWx3 uint8) -> CamVid probabilities [11, H, W] float32 at the
    frame's size; ``name`` and ``path`` (its weights) key the cache."""
    name: str
    path: Path
    probabilities: Callable[[np.ndarray], np.ndarray]

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return self.probabilities(rgb)


def _resize_planes(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2
    if planes.shape[1:] == (height, width):
        return planes
    resized = cv2.resize(np.ascontiguousarray(planes.transpose(1, 2, 0)), (width, height),
                         interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(resized.transpose(2, 0, 1))


def _camvid_mass(probabilities: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """[K, h, w] probabilities of a teacher's K classes -> [11, h, w]: each CamVid class the sum of
    the teacher classes in its group."""
    return np.stack([probabilities[list(g)].sum(axis=0) for g in groups]).astype(np.float32)


def _softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def enet_probabilities(path: str | Path | None = None, threads: int | None = None) -> CamvidProbabilities:
    """The ENet Cityscapes teacher (OpenCV DNN, 1024x512): 0 Unlabeled, then the 19 classes."""
    from cvseg_ros.training.teacher import Teacher
    teacher = Teacher(path, threads=threads)

    def probabilities(rgb: np.ndarray) -> np.ndarray:
        mass = _camvid_mass(_softmax(teacher.scores(rgb)), CAMVID_CLASS_MAP)
        return _resize_planes(mass, *rgb.shape[:2])
    return CamvidProbabilities(f"enet:{teacher.path.name}", teacher.path, probabilities)


def espnetv2_probabilities(path: str | Path | None = None) -> CamvidProbabilities:
    """The ESPNetv2 Cityscapes teacher (PyTorch, 1024x512): the 19 classes (ENet's 1..19 as 0..18),
    then 19 background."""
    import torch

    from cvseg_ros.model.espnetv2 import espnetv2_cityscapes
    path = Path(path) if path else shared_data_dir() / ESPNETV2_FILE
    net = espnetv2_cityscapes(path).eval()
    groups = [[t - 1 for t in g] for g in CAMVID_CLASS_MAP]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    @torch.inference_mode()
    def probabilities(rgb: np.ndarray) -> np.ndarray:
        import torch.nn.functional as F
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(512, 1024), mode="bilinear", align_corners=False)
        logits = net((x - mean) / std)
        prob = logits.float().softmax(dim=1)[0].numpy()
        return _resize_planes(_camvid_mass(prob, groups), *rgb.shape[:2])
    return CamvidProbabilities(f"espnetv2:{path.name}", path, probabilities)


TEACHERS = ("enet", "espnetv2")   # the Cityscapes teachers of the shared data
#: the teachers whose ensemble scores unlabelled video (``cvseg eval --video``, ``cvseg heldout``):
#: both; ENet alone fails on footage unlike its training streets (vtest: about 10 mIoU for every method)
REFERENCE = TEACHERS


def default_teachers(threads: int | None = None, log: Callable[[str], None] = print,
                     names: Sequence[str] = ("enet",), data: str | Path | None = None) -> list[CamvidProbabilities]:
    """The Cityscapes teachers ``names`` (of :data:`TEACHERS`), read from ``data``'s ``teacher/``
    (default: the shared data)."""
    unknown = [n for n in names if n not in TEACHERS]
    if unknown or not names:
        raise ValueError(f"teachers {list(names)}: choose one or more of {', '.join(TEACHERS)}")
    data = Path(data) if data is not None else shared_data_dir()
    teachers = []
    for name in names:
        if name == "enet":
            enet = data / ENET_FILE
            if not enet.is_file():
                raise FileNotFoundError(f"ENet teacher not found: {enet}")
            teachers.append(enet_probabilities(enet, threads=threads))
        else:
            espnet = data / ESPNETV2_FILE
            if not espnet.is_file():
                raise FileNotFoundError(f"ESPNetv2 teacher not found: {espnet}")
            teachers.append(espnetv2_probabilities(espnet))
    log(f"teachers: {', '.join(t.name for t in teachers)}")
    return teachers


def teacher_names(text: str) -> tuple[str, ...]:
    """``"enet,espnetv2"`` -> ("enet", "espnetv2")."""
    return tuple(n.strip().lower() for n in text.split(",") if n.strip())


def cache_key(header: str, teachers: Sequence[CamvidProbabilities], frames: Sequence[np.ndarray]) -> str:
    """Hex digest of what the teachers' outputs on ``frames`` depend on: ``header`` (the format and
    settings of what is cached), each teacher's name and weights file, each frame's pixels."""
    import hashlib

    from cvseg_ros.model.checkpoint import file_sha256
    key = hashlib.sha256(header.encode())
    for teacher in teachers:
        key.update(f"{teacher.name}:{file_sha256(teacher.path)}|".encode())
    for rgb in frames:
        key.update(hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).digest())
    return key.hexdigest()


def ensemble_labels(probabilities: Sequence[np.ndarray], confidence: float = 0.5) -> np.ndarray:
    """CamVid ids HxW uint8 from each teacher's [11, H, W] probabilities (see the module doc)."""
    mean = np.mean(probabilities, axis=0)
    label = mean.argmax(axis=0).astype(np.uint8)
    void = mean.max(axis=0) < confidence
    for p in probabilities:
        own = p.argmax(axis=0)
        own_none = 1.0 - p.sum(axis=0) > p.max(axis=0)     # "no CamVid class" would win
        void |= (own != label) | own_none
    label[void] = VOID
    return label
