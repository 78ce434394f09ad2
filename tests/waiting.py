"""Polling for the integration tests: bounded in time, never a bare sleep."""
from __future__ import annotations

from typing import Any, Callable

from testbed.kit import poll_until


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, step: float = 0.02,
             what: str = "condition") -> Any:
    """Call `predicate` until it returns something truthy and return that; fail the
    test (AssertionError naming `what`) if `timeout` seconds pass first."""
    value = poll_until(predicate, timeout, step)
    if not value:
        raise AssertionError(f"{what} not reached within {timeout} s")
    return value
