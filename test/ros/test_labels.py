"""Colour maps over a checkpoint's palette, and the label info JSON (ROS-free)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cvseg_ros.model.checkpoint import read_metadata, resolve_checkpoint
from cvseg_ros.ros.labels import UNKNOWN_ID, label_info_json, read_color_map


@pytest.fixture(scope="module")
def shipped():
    meta = read_metadata(resolve_checkpoint("fast"))
    return list(meta["classes"]), np.asarray(meta["palette"], np.uint8)


@pytest.mark.parametrize("name,text", [("c.yaml", "Road: '#FF00ff'\nCar: [0, 0, 255]\n"),
                                       ("c.json", '{"Road": "#ff00ff", "Car": [0, 0, 255]}')])
def test_a_colour_map_replaces_the_colours_it_names(shipped, tmp_path, name, text):
    classes, palette = shipped
    path = tmp_path / name
    path.write_text(text)
    out = read_color_map(path, classes, palette)
    changed = {classes[i] for i in np.flatnonzero((out != palette).any(axis=1))}
    assert changed == {"Road", "Car"}
    assert tuple(out[classes.index("Road")]) == (255, 0, 255) and tuple(out[classes.index("Car")]) == (0, 0, 255)
    assert palette[classes.index("Road")].tolist() != [255, 0, 255]          # the input is not changed


@pytest.mark.parametrize("text,needle", [
    ('{"Lava": [1, 2, 3]}', "unknown class 'Lava'"),
    ('{"Road": [1, 2, 300]}', "[r, g, b] (0..255)"),
    ('{"Road": "#12345"}', "'#rrggbb'"),
    ('{"Road": [true, 2, 3]}', "[r, g, b]"),
    ('[1, 2, 3]', "expected a mapping"),
    ('{}', "expected a mapping"),
    ('{"Road": ', "cannot be parsed"),
    ("[" * 100000, "cannot be parsed"),
])
def test_a_bad_colour_map_is_refused_with_the_reason(shipped, tmp_path, text, needle):
    classes, palette = shipped
    path = tmp_path / "colors.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="colour map") as info:
        read_color_map(path, classes, palette)
    assert needle in str(info.value)
    with pytest.raises(ValueError, match="not a regular file"):
        read_color_map(tmp_path, classes, palette)


def test_label_info_lists_every_class_with_its_id_name_and_colour(shipped):
    classes, palette = shipped
    info = json.loads(label_info_json(classes, palette))
    assert [c["id"] for c in info["classes"]] == list(range(len(classes)))
    assert [c["name"] for c in info["classes"]] == classes
    assert np.array_equal(np.array([c["color"] for c in info["classes"]], np.uint8), palette)
    assert info["unknown_id"] == UNKNOWN_ID and info["mask_encoding"] == "mono8"
