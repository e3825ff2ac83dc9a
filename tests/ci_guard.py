"""The CI guard, a pytest plugin: under CI (the ``CI`` environment variable set) no test may be skipped.

tests/conftest.py imports these hooks; tests/test_ci_guard.py loads this module alone (``-p ci_guard``)
in a pytest subprocess, to show that a skip fails the run.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI every check must run: a skip there (a missing extra, browser or dataset) is a failure."""
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {report.longrepr}"


_skipped_collections: list = []  # collection reports skipped under CI: a module-level skip never reaches the hook above


def pytest_collectreport(report):
    """A module skipped while it is collected (``pytest.importorskip`` or ``pytest.skip(allow_module_level=True)``
    at its top) has no test reports: record it, so the run still fails."""
    if in_ci() and report.skipped:
        _skipped_collections.append(report)


def pytest_terminal_summary(terminalreporter):
    for report in _skipped_collections:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        terminalreporter.write_line(f"FAILED {report.nodeid}: skipped in CI, where every test must run: {reason}", red=True, bold=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if _skipped_collections and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
