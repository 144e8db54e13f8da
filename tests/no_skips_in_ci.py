"""In CI (`CI=true`, as `.ci/run` and hosted CI services set it) a skipped test fails, so that a
missing tool (tmux, the console script) cannot turn a proof into a silent pass. Only tests marked
`gpu` may skip there: CI has no GPU. On a developer's machine skips stay skips, with their reason.

tests/conftest.py imports these hooks; tests/test_ci.py runs them on tests that skip.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; the only tests that may skip in CI")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail(report, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"{what} skipped in CI, where only tests marked `gpu` may skip: {_reason(report)}\n"
        "(install what it needs, or run outside CI without CI=true)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if (
        in_ci()
        and report.skipped
        and not hasattr(report, "wasxfail")  # an xfail is not a skip
        and item.get_closest_marker("gpu") is None
    ):
        _fail(report, "this test was")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if in_ci() and report.skipped:  # a module that skipped itself whole (importorskip, allow_module_level)
        _fail(report, "this module was")
    return report
