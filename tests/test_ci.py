"""CI cannot skip: with CI=true every way a test can skip fails it, except for tests marked `gpu`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO

SKIPPING = """
import pytest

def test_skip_in_the_body():
    pytest.skip("tmux is not installed")

@pytest.mark.skipif(True, reason="the console script is not installed")
def test_skipif_mark():
    pass

@pytest.fixture
def tool():
    pytest.skip("no tool to set up")

def test_skip_in_a_fixture(tool):
    pass

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="no CUDA GPU")
def test_gpu_only():
    pass

@pytest.mark.xfail(reason="a known failure, not a skip")
def test_expected_failure():
    assert False

def test_passes():
    pass
"""


def run_them(tmp_path, ci: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Run the skipping tests in a pytest of their own with our plugin: the result, {test or module: outcome}."""
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "test_whole_module.py").write_text('import pytest\npytest.importorskip("no_such_module")\n')
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.no_skips_in_ci",
            "-p",
            "no:cacheprovider",
            "-v",
            "-rA",
            "-o",
            "addopts=",
            "-o",
            "testpaths=",
            "--continue-on-collection-errors",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    tests = re.findall(r"^\S+::(\w+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL)", result.stdout, re.MULTILINE)
    modules = re.findall(r"^ERROR (\S+\.py)(?: - |$)", result.stdout, re.MULTILINE)
    return result, {**dict(tests), **{module: "ERROR" for module in modules}}


def test_with_ci_true_a_skip_fails_unless_the_test_is_gpu_only(tmp_path):
    result, outcomes = run_them(tmp_path, "true")
    assert outcomes == {
        "test_skip_in_the_body": "FAILED",
        "test_skipif_mark": "ERROR",
        "test_skip_in_a_fixture": "ERROR",
        "test_gpu_only": "SKIPPED",
        "test_expected_failure": "XFAIL",
        "test_passes": "PASSED",
        "test_whole_module.py": "ERROR",
    }, result.stdout
    assert result.returncode == 1
    assert "skipped in CI, where only tests marked `gpu` may skip: tmux is not installed" in result.stdout


def test_outside_ci_skips_stay_skips_and_say_why(tmp_path):
    result, outcomes = run_them(tmp_path, "")
    assert outcomes == {
        "test_skip_in_the_body": "SKIPPED",
        "test_skipif_mark": "SKIPPED",
        "test_skip_in_a_fixture": "SKIPPED",
        "test_gpu_only": "SKIPPED",
        "test_expected_failure": "XFAIL",
        "test_passes": "PASSED",
    }, result.stdout
    assert result.returncode == 0
    assert "SKIPPED (tmux is not installed)" in result.stdout
