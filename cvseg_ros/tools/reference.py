"""Reference labels for unlabelled video: the Cityscapes teachers' ensemble
(:mod:`cvseg_ros.training.ensemble`), run on the *clean* frames (as decoded from the source file,
before the evaluation encodes them again). The labels are cached on disk, keyed by the frames'
content and the teachers' files, so that every method and every later run is scored against the
same reference without running the teachers again.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from cvseg_ros.common.paths import cache_dir
from cvseg_ros.training.ensemble import CamvidProbabilities, cache_key, ensemble_labels

REFERENCE_FORMAT = 1                # part of the cache key: bump when the labelling rule changes


def reference_labels(frames: Sequence[np.ndarray], teachers: Sequence[CamvidProbabilities], *,
                     confidence: float = 0.5, cache: bool = True, progress: bool = True) -> list[np.ndarray]:
    """:func:`ensemble_labels` of every frame, cached under the user's cache directory."""
    from tqdm import tqdm

    key = cache_key(f"v{REFERENCE_FORMAT}|{confidence}|", teachers, frames)
    path = cache_dir() / "reference" / f"{key[:20]}.npz"
    if cache and path.is_file():
        with np.load(path) as z:
            return list(z["labels"])
    labels = [ensemble_labels([t(rgb) for t in teachers], confidence)
              for rgb in tqdm(frames, desc="reference labels", unit="frame", disable=not progress)]
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")   # one per process: two runs may share the cache
        np.savez_compressed(tmp, labels=np.stack(labels))
        tmp.replace(path)
    return labels
