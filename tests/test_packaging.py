"""Packaging: the wheel carries the corpora and configs; `python -m tiedlm` and `--version`; ruff clean."""

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import tiedlm

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_the_corpora_and_configs(tmp_path):
    command = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q"]
    done = subprocess.run([*command, "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [wheel] = tmp_path.glob("tiedlm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for corpus in ("ptb", "wikitext-2"):
        for split in ("train", "valid", "test"):
            assert f"tiedlm/datasets/{corpus}/{split}.txt.xz" in names
    assert "tiedlm/datasets/SHA256SUMS" in names and "tiedlm/py.typed" in names
    assert "tiedlm/configs/ptb/small-real.toml" in names and "tiedlm/configs/ptb/rhn-re.toml" in names
    assert any(name.endswith("entry_points.txt") for name in names)


def test_python_dash_m_and_version():
    done = subprocess.run([sys.executable, "-m", "tiedlm", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"tiedlm {tiedlm.__version__}"
    done = subprocess.run([sys.executable, "-m", "tiedlm", "nonsense"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("tiedlm: error:")


def lint_folders() -> list[str]:
    """The folders `make lint` checks (the Makefile's LINT)."""
    [line] = re.findall(r"^LINT := (.+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    return line.split()


def test_make_lint_covers_every_python_folder():
    folders = [
        d for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in ("build", "dist")
    ]
    with_python = {d.name for d in folders if next(d.rglob("*.py"), None) is not None}
    assert {"src", "tests", "scripts", "benchmarks"} <= with_python <= set(lint_folders()), with_python


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is a dev dependency")  # fmt: skip
def test_ruff_clean():
    ruff = str(Path(sys.executable).parent / "ruff") if (Path(sys.executable).parent / "ruff").exists() else "ruff"
    folders = [str(ROOT / f) for f in lint_folders()]
    check = subprocess.run([ruff, "check", *folders], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout[-3000:]
    formatted = subprocess.run([ruff, "format", "--check", *folders], capture_output=True, text=True, timeout=120)
    assert formatted.returncode == 0, formatted.stdout[-3000:]


# --- module size and imports --------------------------------------------------------------------------------

SRC = ROOT / "src"
MAX_LINES = 400
LONG_REASON = "Longer than 400 lines because"


def package_modules() -> dict[str, Path]:
    """Every module of src/tiedlm by dotted name (a package by its __init__.py)."""
    modules = {}
    for path in sorted((SRC / "tiedlm").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def test_no_module_is_longer_than_400_lines_without_saying_why():
    too_long = {}
    for name, path in package_modules().items():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and not any(line.startswith(LONG_REASON) for line in docstring.splitlines()):
            too_long[name] = lines
    assert too_long == {}, f"over {MAX_LINES} lines, and no docstring line starting {LONG_REASON!r}"


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``tree`` imports, anywhere in it: at the top, and also inside
    functions (a lazy import is still a dependency, and a cycle through one fails as soon as both
    ends run). A package's own __init__, which Python runs before any of its modules, is not
    counted as imported by them: that is how a package re-exports its modules' names."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # import tiedlm.a.b.name → the module tiedlm.a.b
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {
        name: imported_modules(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py", known)
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module → the modules it imports) as a path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_check_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    tree = ast.parse("import tiedlm.x\ndef f():\n    from tiedlm.y import thing\n    from . import z\n")
    known = {"tiedlm", "tiedlm.x", "tiedlm.y", "tiedlm.z"}
    assert imported_modules(tree, "tiedlm.w", False, known) == {"tiedlm.x", "tiedlm.y", "tiedlm.z"}


def test_no_import_cycle_among_the_modules():
    graph = import_graph()
    assert "tiedlm.training.loop" in graph["tiedlm.training"]  # the graph sees the package's modules
    assert "tiedlm.cli" in graph["tiedlm.__main__"]
    assert "tiedlm.loss.eager" in graph["tiedlm.loss.compiled"]  # the compiled path imports the eager one
    assert find_cycle(graph) is None
