"""The parameter table (cvseg_ros.ros.params) against config/cvseg.yaml and the README; its checks. No ROS."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cvseg_ros.ros import params
from cvseg_ros.ros.params import CAMERAS, PARAMETERS, ParameterError

REPO = Path(__file__).resolve().parents[2]
PARAMS_FILE = REPO / "config" / "cvseg.yaml"
README = REPO / "README.md"
BEGIN, END = "<!-- parameters:begin -->", "<!-- parameters:end -->"


def file_params() -> dict:
    """The params file's values, flattened the way ROS names them (``front.topic``)."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value
    walk("", yaml.safe_load(PARAMS_FILE.read_text())["cvseg_node"]["ros__parameters"])
    return flat


def test_the_params_file_sets_every_parameter_to_its_default_and_nothing_else():
    flat = file_params()
    expected = {}
    for p in PARAMETERS:
        if p.set_by_node:
            continue
        for q in ([p.for_camera(c) for c in flat[CAMERAS]] if p.is_template else [p]):
            expected[q.name] = q.default
    assert flat == expected
    assert all(type(flat[k]) is type(v) for k, v in expected.items()), "a default of another type"
    # a parameter the node sets is documented there, not set
    for p in PARAMETERS:
        if p.set_by_node:
            assert f"# {p.name}:" in PARAMS_FILE.read_text()


def test_the_readme_holds_the_rendered_table_between_its_markers():
    lines = README.read_text().splitlines()
    assert lines.count(BEGIN) == 1 and lines.count(END) == 1
    between = lines[lines.index(BEGIN) + 1:lines.index(END)]
    assert between == params.markdown().splitlines()


def test_the_module_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "cvseg_ros.ros.params"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert out == params.markdown()
    assert out.count("\n") == len(PARAMETERS) + 2


def test_every_entry_is_complete_and_its_default_passes_its_own_checks():
    names = [p.name for p in PARAMETERS]
    assert len(set(names)) == len(names)
    for p in PARAMETERS:
        assert p.description and p.type in params.TYPES
        assert p.read_only
        if not p.set_by_node:
            q = p.for_camera("front") if p.is_template else p
            assert q.check(q.default) == q.default, p.name
    assert "<camera>.topic" in params.BY_NAME


def test_read_instantiates_the_templates_per_camera_in_the_table_order():
    given = {"cameras": ["front", "rear"], "rear.topic": "/rear/x", "batch_window_ms": 7, "device": " CPU "}
    cfg = params.read(lambda p: given.get(p.name, p.default))
    assert cfg["front.topic"] == "" and cfg["rear.topic"] == "/rear/x"     # "": the input type's default topic
    assert cfg["batch_window_ms"] == 7.0 and isinstance(cfg["batch_window_ms"], float)
    assert cfg["device"] == "cpu"
    assert list(cfg)[:10] == ["cameras", "front.topic", "rear.topic", "front.type", "rear.type",
                              "front.expected_rate_hz", "rear.expected_rate_hz", "front.camera_info_topic",
                              "rear.camera_info_topic", "device"]
    assert cfg["front.type"] == "auto" and cfg["rear.expected_rate_hz"] == 0.0
    assert "class_names" not in cfg


@pytest.mark.parametrize("name,value,needle", [
    ("cameras", [], "'cameras' is empty"),
    ("cameras", None, "'cameras' is empty"),                # how ROS reads `cameras:=[]`
    ("cameras", ["front", "front"], "twice"),
    ("cameras", ["front/x"], "not a valid camera name"),
    ("cameras", "front", "must be a list of strings"),
    ("device", "tpu", "unknown device 'tpu'"),
    ("checkpoint", "/nonexistent/model.safetensors", "file not found"),
    ("qos_reliability", "sometimes", "'best_effort' or 'reliable'"),
    ("queue_depth", 0, "'queue_depth' must be >= 1, got 0"),
    ("queue_depth", "many", "'queue_depth' must be an integer"),
    ("queue_depth", 2.0, "must be an integer"),
    ("threads", -1, "'threads' must be >= 0"),
    ("batch_window_ms", -1, "'batch_window_ms' must be >= 0"),
    ("batch_window_ms", True, "must be a number"),
    ("max_stamp_gap_periods", 1.0, "'max_stamp_gap_periods' must be > 1"),
    ("diagnostics_period", 0, "'diagnostics_period' must be >= 0.05"),
    ("diagnostics_period", 1e-9, "'diagnostics_period' must be >= 0.05"),
    ("batch_window_ms", float("inf"), "must be a finite number"),
    ("batch_window_ms", float("nan"), "must be a finite number"),
    ("batch_window_ms", 1e9, "'batch_window_ms' must be <= 1000"),
    ("threads", 1000, "'threads' must be <= 256"),
    ("queue_depth", 10**6, "'queue_depth' must be <= 1000"),
    ("checkpoint", "/dev/null", "not a regular file"),
    ("input_timeout_s", 0.0, "'input_timeout_s' must be > 0"),
    ("publish_mask", 1, "must be true or false"),
    ("p_frame_branch", "sometimes", "unknown value 'sometimes'"),
    ("p_frame_branch", 0, "must be a string"),
])
def test_bad_values_get_one_clear_message(name, value, needle):
    with pytest.raises(ParameterError) as info:
        params.BY_NAME[name].check(value)
    assert needle in str(info.value) and f"'{name}'" in str(info.value)


def test_the_checks_normalise_as_the_node_uses_the_values(tmp_path):
    ck = tmp_path / "m.safetensors"
    ck.write_bytes(b"")
    assert params.BY_NAME["checkpoint"].check(f"  {ck} ") == str(ck)
    for name in ("fast", "accurate", "auto", ""):   # the shipped checkpoints by name
        assert params.BY_NAME["checkpoint"].check(name) == name
    assert params.BY_NAME["qos_reliability"].check(" Reliable") == "reliable"
    assert params.BY_NAME["device"].check("cuda:1") == "cuda:1"
    assert params.BY_NAME["max_stamp_gap_periods"].check(2) == 2.0
    branch = params.BY_NAME["p_frame_branch"]     # a YAML boolean or a word
    assert [branch.check(v) for v in (True, False, " Auto", "false")] == ["true", "false", "auto", "false"]


def test_the_table_needs_no_ros():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('rclpy', 'rcl_interfaces'):\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import cvseg_ros.ros.params as p\n"
            "print(len(p.markdown().splitlines()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert int(out.stdout) == len(PARAMETERS) + 2
