"""What the masks' class ids mean, for the node's latched label-info topic, and colour maps that
override a checkpoint's palette (ROS-free).

A colour-map file is JSON or YAML: a mapping from class names to colours, each ``[r, g, b]``
(0..255) or ``"#rrggbb"``; the classes it leaves out keep the checkpoint's colours.

The label info, where ``vision_msgs`` is not installed, is this JSON in a ``std_msgs/String``
(:func:`label_info_json`)::

    {"classes": [{"id": 0, "name": "Sky", "color": [128, 128, 128]}, ...],
     "unknown_id": 255, "mask_encoding": "mono8", "color_encoding": "rgb8"}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

#: the id of a pixel no class was given to (black in the colour mask)
UNKNOWN_ID = 255
MAX_COLOR_MAP_BYTES = 1 << 20


def _color(value, where: str) -> tuple[int, int, int]:
    if isinstance(value, str):
        text = value.strip().lstrip("#")
        if len(text) == 6:
            try:
                return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
            except ValueError:
                pass
    elif (isinstance(value, (list, tuple)) and len(value) == 3
          and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
        return int(value[0]), int(value[1]), int(value[2])
    raise ValueError(f"{where}: a colour is [r, g, b] (0..255) or '#rrggbb', got {value!r}")


def read_color_map(path: str | Path, class_names: Sequence[str], palette: np.ndarray) -> np.ndarray:
    """``palette`` (one RGB row per class) with the colours a colour-map file gives by class name;
    raises ValueError naming the file and what is wrong (unknown class, bad colour, not a map)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"colour map {path}: not a regular file")
    if path.stat().st_size > MAX_COLOR_MAP_BYTES:
        raise ValueError(f"colour map {path}: larger than {MAX_COLOR_MAP_BYTES} bytes")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - yaml.YAMLError, json.JSONDecodeError, RecursionError
        raise ValueError(f"colour map {path}: cannot be parsed ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"colour map {path}: expected a mapping of class names to colours, got "
                         f"{type(data).__name__}")
    out = np.array(palette, dtype=np.uint8, copy=True)
    index = {name: i for i, name in enumerate(class_names)}
    for name, value in data.items():
        if name not in index:
            raise ValueError(f"colour map {path}: unknown class {name!r}; the classes are {', '.join(class_names)}")
        out[index[name]] = _color(value, f"colour map {path}, class {name!r}")
    return out


def label_info_json(class_names: Sequence[str], palette: np.ndarray) -> str:
    """The label info as JSON (see the module docstring)."""
    return json.dumps({
        "classes": [{"id": i, "name": name, "color": [int(c) for c in palette[i]]}
                    for i, name in enumerate(class_names)],
        "unknown_id": UNKNOWN_ID, "mask_encoding": "mono8", "color_encoding": "rgb8",
    })
