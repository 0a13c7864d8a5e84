"""`cvseg eval` end to end on the first real CamVid val frames (encoded to H.264 GOP 12)."""
from __future__ import annotations

import json

import pytest

from cvseg_ros.common.paths import shared_data_dir

from cvseg_ros.common.timing import MS_PER_FRAME_IS
from cvseg_ros.tools.cli import main
from cvseg_ros.model.classes import CAMVID_CLASSES

DATA = shared_data_dir()
VAL = DATA / "camvid" / "val"
VALANNOT = DATA / "camvid" / "valannot"
TEACHER = DATA / "teacher" / "enet-cityscapes.net"
FRAMES, GOP = 14, 12

needs_val = pytest.mark.skipif(not (VAL.is_dir() and VALANNOT.is_dir()),
                               reason=f"real data absent: needs {VAL} and {VALANNOT} (../shared/data next to the repo)")


pytestmark = pytest.mark.usefixtures("restore_threads")


def _in_unit(value) -> bool:
    return value is None or 0.0 <= value <= 1.0


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    if not (VAL.is_dir() and VALANNOT.is_dir()):
        pytest.skip(f"real data absent: needs {VAL} and {VALANNOT} (../shared/data next to the repo)")
    out = tmp_path_factory.mktemp("eval")
    rc = main(["eval", "--frames", str(VAL), "--labels", str(VALANNOT), "--fps", "15", "--gop", str(GOP),
               "--json", str(out / "eval.json"), "--max-frames", str(FRAMES), "--device", "cpu",
               "--threads", "1", "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "eval.json").read_text())


@needs_val
def test_structure(evaluation):
    out, result = evaluation
    assert result["frames"] == FRAMES and result["gop"] == GOP and result["fps"] == 15
    assert result["device"] == "cpu" and result["checkpoint"] and result["threads"]["torch"] == 1
    methods = result["methods"]
    for name in ("compressed", "per_frame", "iframe_copy"):
        assert name in methods
    assert "teacher" not in methods   # only with --teacher
    assert ("compressed_paper" in methods) != ("compressed_paper" in result["skipped"])
    assert "compressed_no_matching" in methods   # the shipped checkpoint matches luma
    assert "compressed_no_branch" in methods     # ... and accumulates the motion
    for name, m in methods.items():
        assert _in_unit(m["miou"]) and m["miou"] is not None, name
        assert _in_unit(m["pixel_acc"]) and m["pixel_acc"] is not None, name
        assert list(m["per_class_iou"]) == list(CAMVID_CLASSES)
        assert all(_in_unit(v) for v in m["per_class_iou"].values())
        assert len(m["miou_by_gop_position"]) == GOP
        assert all(v is not None and 0.0 <= v <= 1.0 for v in m["miou_by_gop_position"])
        assert m["frames_by_gop_position"] == [2, 2] + [1] * (GOP - 2)
        assert m["ms_per_frame"] > 0 and m["missing_masks"] == 0
        # three interleaved timed passes (the first one scored), the figure their median
        passes = m["ms_per_frame_passes"]
        assert len(passes) == result["timing_passes"] == 3 and m["ms_per_frame"] == sorted(passes)[1]
        assert sum(m["networks"].values()) == FRAMES
    assert methods["per_frame"]["networks"] == {"i_frame": FRAMES}
    assert methods["iframe_copy"]["networks"] == {"i_frame": 2, "copy": FRAMES - 2}
    assert methods["compressed"]["networks"] == {"i_frame": 2, "p_frame": FRAMES - 2}
    for variant in ("compressed_no_matching", "compressed_no_branch"):   # the same I-frames, other P-frames
        assert methods[variant]["networks"] == methods["compressed"]["networks"]
        assert methods[variant]["miou_by_gop_position"][0] == methods["compressed"]["miou_by_gop_position"][0]
        assert methods[variant]["miou_by_gop_position"][1:] != methods["compressed"]["miou_by_gop_position"][1:]
        assert variant in result["derived"]
    assert "speedup" in result and "gap_closed" in result and "compressed" in result["derived"]
    assert MS_PER_FRAME_IS in result["ms_per_frame_is"]    # the definition `cvseg bench` uses too


@needs_val
def test_i_frame_position_agrees(evaluation):
    """At GOP position 0 every engine method runs the same I-frame network on the same pixels."""
    _, result = evaluation
    methods = result["methods"]
    first = methods["compressed"]["miou_by_gop_position"][0]
    assert methods["iframe_copy"]["miou_by_gop_position"][0] == pytest.approx(first, abs=1e-9)
    assert methods["per_frame"]["miou_by_gop_position"][0] == pytest.approx(first, abs=1e-9)


@needs_val
def test_report_files(evaluation):
    out, result = evaluation
    png, md = out / "miou_by_gop.png", out / "eval.md"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = md.read_text()
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert "| I ms | P ms |" in rows["Method"]
    for name, m in result["methods"].items():   # each method's row, with its I- and P-frame times
        by_kind = m["ms_per_frame_by_kind"]
        assert f" | {by_kind['I']:.2f} | {by_kind['P']:.2f} | " in rows[name]
    assert "| Sky |" in table and "mIoU %" in table


@needs_val
@pytest.mark.skipif(not TEACHER.is_file(), reason=f"real data absent: needs {TEACHER}")
def test_teacher_method(tmp_path):
    rc = main(["eval", "--frames", str(VAL), "--labels", str(VALANNOT), "--gop", "4", "--max-frames", "3",
               "--methods", "iframe_copy", "teacher", "--teacher", str(TEACHER), "--device", "cpu", "--threads", "1",
               "--json", str(tmp_path / "t.json"), "--out-dir", str(tmp_path / "report"), "--no-progress"])
    assert rc == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert list(result["methods"]) == ["iframe_copy", "teacher"]
    teacher = result["methods"]["teacher"]
    assert teacher["networks"] == {"teacher": 3} and teacher["missing_masks"] == 0
    assert 0.0 < teacher["miou"] <= 1.0 and 0.0 < teacher["pixel_acc"] <= 1.0
    assert result["gap_closed"] is None   # no compressed method was run
    assert (tmp_path / "report" / "eval.md").is_file() and (tmp_path / "report" / "miou_by_gop.png").is_file()


def test_bad_arguments(tmp_path):
    rc = main(["eval", "--frames", str(tmp_path / "nope"), "--labels", str(tmp_path / "nope"),
               "--json", str(tmp_path / "x.json"), "--no-progress"])
    assert rc == 1
    assert not (tmp_path / "x.json").exists()


@needs_val
def test_both_shipped_checkpoints_in_one_run(tmp_path):
    """``--checkpoint fast,accurate``: every method of each, named method@checkpoint, each compressed
    method compared with its own checkpoint's per_frame and iframe_copy."""
    rc = main(["eval", "--frames", str(VAL), "--labels", str(VALANNOT), "--gop", "6", "--json", str(tmp_path / "e.json"),
               "--max-frames", "8", "--device", "cpu", "--threads", "1", "--no-progress", "--timing-passes", "1",
               "--checkpoint", "fast,accurate", "--methods", "compressed", "per_frame", "iframe_copy"])
    assert rc == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert sorted(result["methods"]) == sorted(f"{m}@{c}" for m in ("compressed", "per_frame", "iframe_copy")
                                               for c in ("fast", "accurate"))
    assert [p.rsplit("/", 1)[1] for p in result["checkpoints"].values()] == [
        "cvseg_improved.safetensors", "cvseg_improved_espnetv2.safetensors"]
    methods = result["methods"]
    for c in ("fast", "accurate"):
        gap = result["derived"][f"compressed@{c}"]["gap_closed"]
        expected = ((methods[f"compressed@{c}"]["miou"] - methods[f"iframe_copy@{c}"]["miou"])
                    / (methods[f"per_frame@{c}"]["miou"] - methods[f"iframe_copy@{c}"]["miou"]))
        assert gap == pytest.approx(expected, abs=1e-3)
    # the two I-frame networks are different networks: their I-frame masks differ
    assert methods["per_frame@fast"]["miou"] != methods["per_frame@accurate"]["miou"]
    assert "compressed@accurate" in (tmp_path / "eval.md").read_text()
