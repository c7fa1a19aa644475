"""A process whose watchdog was never closed exits cleanly: the interpreter's exit stops the thread
before finalizing (a daemon thread still inside a torch call then aborts the process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

# poll_s=0: the thread is nearly always inside a store or sequence-number call when main exits
LEFT_RUNNING = """
import sys, time
import torch.distributed as dist
from parallel.observe.watchdog import Watchdog
store = dist.TCPStore("127.0.0.1", 0, 1, True)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
watchdog = Watchdog(store, lambda: {"0": dist.group.WORLD}, {}, None, None, 600.0, poll_s=0.0)
watchdog.start()
time.sleep(0.3)
sys.exit(7)  # as a run that failed before closing it
"""


@pytest.mark.long(4)
def test_an_unclosed_watchdog_does_not_abort_the_exit() -> None:
    result = subprocess.run(
        [sys.executable, "-c", LEFT_RUNNING],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 7, result.stderr[-2000:]  # -6 (SIGABRT) without the atexit close
    assert "terminate called" not in result.stderr
