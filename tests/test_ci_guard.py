"""The CI guard (tests/ci_guard.py) fails a run under CI on any skip, a module-level one included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

MODULE_SKIP = '''
import pytest

pytest.importorskip("a_module_ktransfer_never_has")


def test_never_runs():
    pass
'''

FUNCTION_SKIP = '''
import pytest


def test_skips():
    pytest.importorskip("a_module_ktransfer_never_has")
'''

PASSES = '''
def test_passes():
    pass
'''


def run_pytest(tmp_path: Path, source: str, ci: bool) -> subprocess.CompletedProcess:
    """pytest in a subprocess on ``source`` and a file that passes, with only the CI guard loaded; CI set or not."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # its own rootdir: no project conftest, no addopts
    (tmp_path / "test_case.py").write_text(source)
    (tmp_path / "test_other.py").write_text(PASSES)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    if ci:
        env["CI"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "ci_guard", "-p", "no:cacheprovider", "-q", "-rs", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("source", [MODULE_SKIP, FUNCTION_SKIP], ids=["module-level", "in a test"])
def test_a_skip_fails_the_run_under_ci(tmp_path, source):
    result = run_pytest(tmp_path, source, ci=True)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "skipped in CI, where every test must run" in result.stdout, result.stdout


@pytest.mark.parametrize("source", [MODULE_SKIP, FUNCTION_SKIP], ids=["module-level", "in a test"])
def test_outside_ci_a_skip_is_only_reported(tmp_path, source):
    result = run_pytest(tmp_path, source, ci=False)
    assert result.returncode == 0 and "1 passed, 1 skipped" in result.stdout, result.stdout + result.stderr


def test_a_clean_run_passes_under_ci(tmp_path):
    result = run_pytest(tmp_path, PASSES, ci=True)
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout + result.stderr
