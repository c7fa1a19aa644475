"""What rank 0 tells the user outside the step lines: the start-up banner and word from every
long phase (build, load, save, sample), each line also appended to the run's train.log."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

LOG_NAME = "train.log"
QUIET_S = 2.0  # a phase shorter than this says nothing when it ends


class Console:
    """Prints on rank 0 of a run with a folder, and keeps a timestamped copy in its train.log."""

    def __init__(self, run_dir: Path | None) -> None:
        # silent for library calls (no run folder), as the rest of a run's output is
        self.enabled = run_dir is not None and int(os.environ.get("RANK", "0")) == 0
        self.log = run_dir / LOG_NAME if run_dir is not None and self.enabled else None

    def say(self, line: str) -> None:
        """One line on stdout and in train.log."""
        if not self.enabled:
            return
        print(line, flush=True)
        self.record(line)

    def record(self, line: str) -> None:
        """Append a line to train.log only (the progress bar prints its own)."""
        if self.log is not None:
            stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            with open(self.log, "a") as f:
                f.write(f"{stamp} {line}\n")

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """`what...` when it starts and `what: 12.3 s` when it ends, if that took a while."""
        start = time.perf_counter()
        self.say(f"[{datetime.now():%H:%M:%S}] {what}...")
        yield
        elapsed = time.perf_counter() - start
        if elapsed >= QUIET_S:
            self.say(f"[{datetime.now():%H:%M:%S}] {what}: done in {elapsed:.1f} s")
