"""The README's Python examples run as written, and its quick start matches the Makefile."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_examples_run(trained_run, tmp_path):
    # The examples name runs/ptb-small-real and /tmp/tiedlm-example; here they get a tiny trained
    # run and a temporary folder instead, and run otherwise as written.
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        block = block.replace('"runs/ptb-small-real"', repr(str(trained_run)))
        block = block.replace('"/tmp/tiedlm-example"', repr(str(tmp_path / "example")))
        exec(compile(block, str(README), "exec"), {})


def test_quick_start_is_the_two_make_targets():
    quick_start = README.read_text().split("## Quick start")[1].split("##")[0]
    commands = [
        line.split("#")[0].strip() for line in re.findall(r"```sh\n(.*?)```", quick_start, flags=re.S)[0].splitlines()
    ]
    assert commands == ["make demo", "make test"]
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    assert "make test" in (README.parent / ".ci" / "run").read_text()


def test_results_section_is_generated_from_results():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_results", README.parent / "scripts" / "render_results.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    text = README.read_text()
    assert render.update(README, render.section()) == text, "run python scripts/render_results.py"
    # every results file the section links exists
    generated = text.split(render.BEGIN)[1].split(render.END)[0]
    for link in re.findall(r"\]\(([^)#]+)\)", generated):
        assert (README.parent / link).is_file(), link
