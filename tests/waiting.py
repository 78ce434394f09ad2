"""Polling for the integration tests: bounded in time, never a bare sleep."""
from __future__ import annotations

import time
from typing import Any, Callable


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, step: float = 0.02,
             what: str = "condition") -> Any:
    """Call `predicate` until it returns something truthy and return that; fail the
    test (AssertionError naming `what`) if `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"{what} not reached within {timeout} s")
