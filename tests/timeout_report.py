"""What a test that outlived its timeout was waiting on.

pytest-timeout (`timeout` in pyproject) fails such a test and prints its threads' stacks.
An async test that hangs sits in the event loop's select with every thread idle, so those
stacks say nothing; the loop's tasks, each with the await it is stuck on, say where. This
wraps the handler pytest-timeout installs so the tasks are printed first."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Generator
from types import FrameType
from typing import Any

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Generator[None, Any, Any]:
    installed = yield
    timed_out = signal.getsignal(signal.SIGALRM)
    if callable(timed_out):  # the signal method: its handler runs in the loop's thread

        def tasks_then_timed_out(signum: int, frame: FrameType | None) -> None:
            print_tasks(item.nodeid)
            timed_out(signum, frame)

        signal.signal(signal.SIGALRM, tasks_then_timed_out)
    return installed


def print_tasks(nodeid: str) -> None:
    """Each task of the running event loop, with the stack of the await it is on."""
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no loop running: a synchronous test
        return
    print(f"\n{nodeid} timed out; {len(tasks)} asyncio tasks:", file=sys.stderr)
    for task in tasks:
        task.print_stack(file=sys.stderr)
