"""Shared fixtures: a local stand-in of the Anthropic Messages API (see fake_anthropic.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fake_anthropic import FakeAnthropic


@pytest.fixture
def fake_anthropic() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server
