"""The Python examples in the README and docs/ run (on a small Fashion-MNIST look-alike and a tiny zoo).

A block whose first line is a comment starting with ``# not run`` says why it cannot run here
(a path on the reader's disk, a download) and is only compiled.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks():
    for path in DOCS:
        for number, match in enumerate(BLOCK.finditer(path.read_text(encoding="utf-8")), 1):
            yield pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}#{number}")


# The pages that document a Python API: each shows it in an example that runs here.
PYTHON_PAGES = ["README.md", "docs/tracking.md", "docs/transfer.md", "docs/multi-teacher.md", "docs/methods.md", "docs/study.md", "docs/guard.md", "docs/checkpoints.md", "docs/analyze.md", "docs/scouting.md"]


def test_every_page_with_a_python_api_has_a_runnable_example():
    runnable = {param.id.partition("#")[0] for param in blocks() if not param.values[0].lstrip().startswith("# not run")}
    assert [page for page in PYTHON_PAGES if page not in runnable] == []


@pytest.mark.parametrize("code", list(blocks()))
def test_example_runs(code, small_fashion_mnist, tiny_zoo, tmp_path, monkeypatch):
    compiled = compile(code, "<docs>", "exec")
    if code.lstrip().startswith("# not run"):
        return
    monkeypatch.setenv("KTRANSFER_FASHION_MNIST", str(small_fashion_mnist))
    monkeypatch.chdir(tmp_path)
    exec(compiled, {"__name__": "__docs__"})
