"""Shared fixtures: a local stand-in of the Anthropic Messages API (see fake_anthropic.py), and the
data cache that prepare.py and train.py use during the tests.

prepare.py reads AUTORESEARCH_PRESET, AUTORESEARCH_TIME_BUDGET and AUTORESEARCH_CACHE when it is
first imported, so they are set here, before any test module imports it: the cpu preset and a fresh
cache directory for the whole session. Subprocesses inherit them unless a test overrides them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_anthropic import FakeAnthropic
from fake_github import GitHubStub

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_CACHE = tempfile.mkdtemp(prefix="autoresearch-test-cache-")
atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)
for _name in ("AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_SEED", "AUTORESEARCH_RUN_DIR"):
    os.environ.pop(_name, None)
os.environ["AUTORESEARCH_PRESET"] = "cpu"
os.environ["AUTORESEARCH_CACHE"] = TEST_CACHE


@pytest.fixture
def fake_anthropic() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server


@pytest.fixture
def github() -> Iterator[GitHubStub]:
    with GitHubStub() as server:
        yield server


@pytest.fixture(scope="session")
def prepared_builtin() -> dict:
    """The builtin source prepared once in the session cache; returns prepare.py's manifest."""
    import prepare

    return prepare.prepare("builtin")


@pytest.fixture
def run_python():
    """Run `python ARGS...` (cwd: the repository) with the session environment plus `env`."""

    def run(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=cwd, env={**os.environ, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def assert_user_error():
    """Check a finished command failed with exit 1 and one sentence on stderr, no traceback."""

    def check(result: subprocess.CompletedProcess[str], *phrases: str) -> str:
        message = result.stderr.strip()
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert len(message.splitlines()) == 1 and message.endswith("."), message
        for phrase in phrases:
            assert phrase in message
        return message

    return check


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """For tests of tiny tensors, where a second torch thread only waits for a busy core."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
