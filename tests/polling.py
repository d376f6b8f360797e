"""Waiting on a condition with a deadline, as every test here waits (nothing beyond the standard
library, so that tests which run in the device image can use it too)."""

from __future__ import annotations

import asyncio
import time


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """The condition's first true value, polled every `interval` s; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


async def async_wait_for(condition, timeout: float, what: str, interval: float = 0.01):
    """As wait_for, without blocking the event loop (which may have messages of its own to send)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        await asyncio.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
