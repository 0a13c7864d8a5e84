"""launch/cvseg.launch.py: builds with launch_ros when it is importable; otherwise everything the
file references (package, executable, params file, parameter and argument names) is checked to exist
by reading its source (launch_ros is not on PyPI)."""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch" / "cvseg.launch.py"
PARAMS = REPO / "config" / "cvseg.yaml"


def _tree() -> ast.Module:
    return ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))


def _constants() -> dict[str, str]:
    out = {}
    for node in _tree().body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out


def _calls(name: str) -> list[ast.Call]:
    return [n for n in ast.walk(_tree()) if isinstance(n, ast.Call)
            and getattr(n.func, "id", getattr(n.func, "attr", None)) == name]


def _params() -> dict:
    return yaml.safe_load(PARAMS.read_text())["cvseg_node"]["ros__parameters"]


def test_references_exist():
    consts = _constants()
    package_xml = (REPO / "package.xml").read_text()
    setup_py = (REPO / "setup.py").read_text()
    assert f"<name>{consts['PACKAGE']}</name>" in package_xml
    assert re.search(rf'"{consts["EXECUTABLE"]}\s*=\s*cvseg_ros\.ros\.node:main"', setup_py)
    assert (REPO / consts["PARAMS_FILE"]).is_file()
    # setup.py installs what the launch file looks up under share/<package>/
    assert 'glob("config/*.yaml")' in setup_py and 'glob("launch/*.launch.py")' in setup_py
    assert "cvseg_node" in yaml.safe_load(PARAMS.read_text())     # the node name the file targets
    # the Node(...) action
    (node_call,) = _calls("Node")
    kwargs = {k.arg: k.value for k in node_call.keywords}
    assert {"package", "executable", "parameters"} <= set(kwargs)
    assert ast.unparse(kwargs["package"]) == "PACKAGE" and ast.unparse(kwargs["executable"]) == "EXECUTABLE"
    assert ast.unparse(kwargs["parameters"]) == "[params_file, overrides]"


def test_launch_arguments_and_overrides_match_the_node():
    declared = {ast.literal_eval(c.args[0]) for c in _calls("DeclareLaunchArgument")}
    assert declared == {"params_file", "cameras", "device"}
    used = {ast.literal_eval(c.args[0]) for c in _calls("LaunchConfiguration")}
    assert used <= declared
    overrides = {ast.literal_eval(n.slice) for n in ast.walk(_tree()) if isinstance(n, ast.Subscript)
                 and isinstance(n.value, ast.Name) and n.value.id == "overrides"}
    assert overrides == {"cameras", "device"}
    assert overrides <= set(_params())          # real node parameters
    from cvseg_ros.ros.params import BY_NAME   # the table the node declares them from
    assert overrides <= set(BY_NAME)


def test_camera_argument_parsing():
    """``parse_cameras`` (the function the launch file uses) on the forms users type."""
    func = next(n for n in _tree().body if isinstance(n, ast.FunctionDef) and n.name == "parse_cameras")
    namespace = {"yaml": yaml}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(LAUNCH), "exec"), namespace)
    parse = namespace["parse_cameras"]
    assert parse("[front, rear]") == ["front", "rear"]
    assert parse("['front']") == ["front"]
    assert parse("front,rear") == ["front", "rear"]
    assert parse(" front ") == ["front"]
    assert parse("") == []


def test_builds_with_launch_ros(monkeypatch):
    pytest.importorskip("launch_ros", reason="launch_ros is not importable here (not on PyPI)")
    import ament_index_python.packages as aip
    from launch import LaunchContext, LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    try:
        aip.get_package_share_directory("cvseg_ros")
    except aip.PackageNotFoundError:     # not installed with colcon: the source tree has the same layout
        monkeypatch.setattr(aip, "get_package_share_directory", lambda name: str(REPO))
    spec = importlib.util.spec_from_file_location("cvseg_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "get_package_share_directory") and not Path(
            module.get_package_share_directory("cvseg_ros"), "config", "cvseg.yaml").is_file():
        monkeypatch.setattr(module, "get_package_share_directory", lambda name: str(REPO))
    ld = module.generate_launch_description()
    assert isinstance(ld, LaunchDescription)
    args = {e.name for e in ld.entities if isinstance(e, DeclareLaunchArgument)}
    assert args == {"params_file", "cameras", "device"}
    context = LaunchContext()
    for e in ld.entities:
        if isinstance(e, DeclareLaunchArgument):
            e.visit(context)
    context.launch_configurations["cameras"] = "[front, rear]"
    (opaque,) = [e for e in ld.entities if isinstance(e, OpaqueFunction)]
    (node,) = opaque.execute(context)
    assert node.node_package == "cvseg_ros" and node.node_executable == "cvseg_node"
