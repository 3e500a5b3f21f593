"""Packaging: the wheel carries the corpora and configs; `python -m tiedlm` and `--version`; ruff clean."""

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
