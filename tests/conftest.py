"""Test conventions shared by the whole suite.

- Hypothesis: profile "ci" (deadline=None, bounded and derandomized examples) when CI=true, else
  "dev" (deadline=None, random examples).
- `gpu` marker: such a test is skipped when CUDA is unavailable.
- With CI=true, every other skip (e.g. a missing optional dependency) is turned into a failure, and
  a session that ran no test at all fails.
"""

import os

import pytest
import torch
from hypothesis import settings

IN_CI = os.environ.get("CI", "").lower() == "true"

settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True,
                          print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile("ci" if IN_CI else "dev")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and "gpu" not in item.keywords:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true forbids skips except GPU tests): {reason}"


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if IN_CI and reporter is not None:
        ran = len(reporter.stats.get("passed", [])) + len(reporter.stats.get("failed", []))
        if ran == 0:
            session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
