"""The repository's shape: imports flow down the layers, modules stay readable, every Markdown
table is well-formed, and the text speaks of the software rather than of its development."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cvseg_ros"

#: a layer may import from layers of a lower rank only (and from itself); equal ranks are siblings
#: that must not import each other (``ros`` and ``training`` both build on the engine)
LAYER_RANKS = {"common": 0, "codec": 1, "model": 2, "engine": 3, "ros": 4, "training": 4, "tools": 5}

#: modules allowed past :data:`MODULE_LINES`, with the reason
LONG_MODULES: dict[str, str] = {}
MODULE_LINES = 450
CLASS_LINES = 320

#: words that speak of how the project was developed, not of what the software does
HISTORY_WORDS = re.compile(
    r"\bsessions? [0-9]|\bthis session\b|\bprevious session\b|\bone-off\b|\btoday\b|\bthis time\b"
    r"|\basked since\b|\bround [0-9]", re.IGNORECASE)


def _layer(module: str) -> str | None:
    """``cvseg_ros.<layer>.…`` -> ``<layer>``; ``None`` for anything outside the layers."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "cvseg_ros" and parts[1] in LAYER_RANKS else None


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of every module that ``source`` (the text of ``module``) imports, at any
    depth of the file (also inside functions), relative imports resolved."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def upward_imports(source: str, module: str) -> list[str]:
    """The imports of ``module`` that run up a layer or across to a sibling layer."""
    own = _layer(module)
    if own is None:
        return []
    bad = []
    for name in sorted(imported_modules(source, module)):
        other = _layer(name)
        if other is not None and other != own and LAYER_RANKS[other] >= LAYER_RANKS[own]:
            bad.append(f"{module} imports {name} ({own} -> {other})")
    return bad


def _modules() -> list[tuple[str, Path]]:
    return sorted((".".join(path.relative_to(REPO).with_suffix("").parts), path)
                  for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def test_the_package_folder_shows_the_layers():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert set(LAYER_RANKS) <= folders
    stray = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert not stray, f"modules outside the layers: {stray}"


def test_the_import_checker_sees_upward_and_sibling_imports():
    """The checker itself: upward, sibling and relative imports are caught, downward ones are not."""
    assert upward_imports("from cvseg_ros.engine.pipeline import SegmentationEngine", "cvseg_ros.model.x")
    assert upward_imports("def f():\n    import cvseg_ros.tools.cli\n", "cvseg_ros.codec.x")
    assert upward_imports("from cvseg_ros.training import train", "cvseg_ros.ros.node")
    assert upward_imports("from ..engine import pipeline", "cvseg_ros.model.segmenter")
    assert upward_imports("from cvseg_ros import engine", "cvseg_ros.codec.decoder")
    assert not upward_imports("from cvseg_ros.codec.annexb import nal_units\nimport torch", "cvseg_ros.engine.x")
    assert not upward_imports("from .state import PFrameState", "cvseg_ros.model.segmenter")
    assert not upward_imports("from cvseg_ros.ros.node import main", "cvseg_ros.tools.cli")


def test_no_module_imports_from_a_layer_above_it():
    bad = [line for module, path in _modules() for line in upward_imports(path.read_text(), module)]
    assert not bad, "\n".join(bad)


def test_modules_stay_readable():
    long = {module: n for module, path in _modules()
            if (n := len(path.read_text().splitlines())) > MODULE_LINES and module not in LONG_MODULES}
    assert not long, f"modules over {MODULE_LINES} lines (split them, or give the reason in LONG_MODULES): {long}"


def test_classes_stay_readable():
    long = [f"{module}.{node.name}: {node.end_lineno - node.lineno + 1}" for module, path in _modules()
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > CLASS_LINES]
    assert not long, f"classes over {CLASS_LINES} lines: {long}"


def markdown_tables(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the header, the table's lines) for every pipe table outside code fences."""
    tables, current, start, fenced = [], [], 0, False
    for number, line in enumerate(text.splitlines() + [""], 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.lstrip().startswith("|"):
            if not current:
                start = number
            current.append(line.strip())
            continue
        if current:
            tables.append((start, current))
            current = []
    return tables


def cells(row: str) -> int:
    """Cells of one table row: pipes that are not escaped and not inside inline code."""
    row = re.sub(r"`[^`]*`", "code", row.replace(r"\|", ""))
    return row.strip().strip("|").count("|") + 1


def malformed_rows(text: str) -> list[str]:
    bad = []
    for start, lines in markdown_tables(text):
        if len(lines) < 2 or not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[1].replace(" ", "")):
            bad.append(f"line {start}: a table without its |---| separator row")
            continue
        width = cells(lines[0])
        bad += [f"line {start + i}: {cells(row)} cells, the header has {width}"
                for i, row in enumerate(lines[1:], 1) if cells(row) != width]
    return bad


def test_the_table_checker_sees_a_missing_cell():
    good = "| a | b |\n|---|--:|\n| 1 | `x|y` |\n"
    assert malformed_rows(good) == []
    assert malformed_rows("| a | b |\n|---|---|\n| 1 |\n")
    assert malformed_rows("| a | b |\n| 1 | 2 |\n")
    assert malformed_rows("```\n| a | b |\n| 1 |\n```\n") == []


def _documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_markdown_table_is_well_formed(doc):
    bad = malformed_rows(doc.read_text())
    assert not bad, f"{doc.name}:\n" + "\n".join(bad)


def test_readme_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 260


def test_the_text_speaks_of_the_software():
    """README, docs, config, launch files and the package's code and docstrings."""
    paths = [*_documents(), *(REPO / "config").rglob("*"), *(REPO / "launch").rglob("*.py"),
             *(path for _, path in _modules()), REPO / "package.xml", REPO / "setup.py"]
    hits = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
            for path in paths if path.is_file() and path.suffix != ".png"
            for number, line in enumerate(path.read_text().splitlines(), 1) if HISTORY_WORDS.search(line)]
    assert not hits, "\n".join(hits)


def test_the_history_words_are_caught():
    for line in ("as measured in session 4", "a one-off patch", "checked again this time", "Today we",
                 "round 3 of the work", "asked since the last"):
        assert HISTORY_WORDS.search(line), line
    for line in ("the round trip through H.264", "every time a frame arrives", "one-offset"):
        assert not HISTORY_WORDS.search(line), line
