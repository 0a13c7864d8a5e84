"""Packaging: `colcon build` in a ROS workspace, and a plain wheel carrying the data files."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = "cvseg_ros"
LAYERS = ("common", "codec", "model", "engine", "ros", "training", "tools")
# never copied into the throw-away source tree: environments, build outputs, caches
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "install", "log", "out", "runs", ".cache",
                                     ".hypothesis", ".pytest_cache", "__pycache__", "*.egg-info", "dist")


def data_files(folder: str) -> list[Path]:
    """The plain files that a data folder of the repo holds (none when it is empty or missing)."""
    root = REPO / folder
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))


def run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def colcon_executable() -> Path:
    """colcon in this interpreter's environment, installed from PyPI if missing (else skip)."""
    exe = Path(sys.executable).parent / "colcon"
    needed = ("colcon_core", "colcon_ros", "colcon_python_setup_py")
    if not exe.exists() or any(importlib.util.find_spec(m) is None for m in needed):
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                   "colcon-common-extensions"], capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            pytest.skip("could not install colcon-common-extensions with pip within 240 s")
        importlib.invalidate_caches()
        if proc.returncode != 0 or not exe.exists():
            pytest.skip(f"colcon-common-extensions could not be installed: {proc.stderr.strip()[-500:]}")
    return exe


@pytest.mark.slow
def test_colcon_build(tmp_path):
    colcon = colcon_executable()
    workspace = tmp_path / "ws"
    (workspace / "src").mkdir(parents=True)
    (workspace / "src" / PACKAGE).symlink_to(REPO, target_is_directory=True)
    run([str(colcon), "build", "--base-paths", "src"], workspace, timeout=300)
    install = workspace / "install" / PACKAGE
    assert (install / "lib" / PACKAGE / "cvseg_node").is_file()
    assert (install / "lib" / PACKAGE / "cvseg").is_file()
    share = install / "share" / PACKAGE
    assert (share / "package.xml").is_file()
    assert (install / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE).is_file()
    for folder in ("config", "launch"):
        for path in data_files(folder):
            assert (share / folder / path.name).is_file(), f"colcon did not install {folder}/{path.name}"


def test_wheel_carries_the_data_files(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=COPY_IGNORE, symlinks=True)
    dist = tmp_path / "dist"
    proc = run([sys.executable, "-m", "pip", "wheel", "-v", "--disable-pip-version-check", "--no-deps",
                "--no-build-isolation", "--no-index", "-w", str(dist), str(source)], tmp_path, timeout=240)
    assert "is absent from the `packages` configuration" not in proc.stdout + proc.stderr, \
        "setuptools warns that a folder with installed files is not among the packages"
    (wheel,) = dist.glob(f"{PACKAGE}-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    data_dirs = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".data")}
    assert len(data_dirs) == 1, names
    share = f"{data_dirs.pop()}/data/share"
    assert f"{share}/{PACKAGE}/package.xml" in names
    assert f"{share}/ament_index/resource_index/packages/{PACKAGE}" in names
    for folder in ("config", "launch"):
        for path in data_files(folder):
            assert f"{share}/{PACKAGE}/{folder}/{path.name}" in names, f"the wheel lacks {folder}/{path.name}"
    for path in data_files(f"{PACKAGE}/checkpoints"):
        assert f"{PACKAGE}/checkpoints/{path.name}" in names, f"the wheel lacks checkpoints/{path.name}"
    for layer in LAYERS:
        assert f"{PACKAGE}/{layer}/__init__.py" in names, f"the wheel lacks the {layer} layer"
    assert not any(n.startswith("test/") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(entry_points).decode()
    assert "cvseg = cvseg_ros.tools.cli:main" in text and "cvseg_node = cvseg_ros.ros.node:main" in text


def test_compiled_loops_run_where_no_cache_can_be_written(monkeypatch):
    """Where Numba finds no writable place for its disk cache (a read-only install and home), the
    loops are compiled in memory instead of failing at import."""
    import numba

    from cvseg_ros.common import jit

    real_njit = numba.njit
    cached_attempts = []

    def njit(*args, **options):
        if options.get("cache"):
            cached_attempts.append(options)
            raise RuntimeError("cannot cache function 'add': no locator available for file 'x.py'")
        return real_njit(*args, **options)

    monkeypatch.setattr(jit.numba, "njit", njit)

    def add(a, b):
        return a + b

    compiled_add = jit.compiled(add)
    assert cached_attempts and compiled_add(2, 3) == 5 and len(compiled_add.signatures) == 1
    with_options = jit.compiled(fastmath=True)(add)   # options reach njit either way
    assert cached_attempts[-1] == {"cache": True, "nogil": True, "fastmath": True} and with_options(2.0, 3.0) == 5.0
