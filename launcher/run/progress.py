"""Progress: a one-line bar with ETA on a terminal, plain lines (with ETA) otherwise.

Hand-written rather than tqdm: one `\\r` line is all that is needed, and metric lines must be
printed above the bar, which is a few lines here and no new dependency.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 30
REDRAW_S = 0.2  # at most five redraws a second: a fast loop must not be slowed by printing


def format_duration(seconds: float) -> str:
    """`1:02:03`, `2:03` or `0:07`."""
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Shows how far a run is and when it will end; silent when not enabled (ranks other than 0)."""

    def __init__(
        self,
        total: int,
        mode: str = "auto",
        enabled: bool = True,
        start: int = 0,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stdout
        self.total, self.enabled, self.step = total, enabled, start
        self.bar = enabled and (mode == "bar" or (mode == "auto" and self.stream.isatty()))
        self._start_step, self._start_time = start, time.perf_counter()
        self._last_draw = 0.0

    def eta_s(self) -> float | None:
        """Seconds left at the mean pace since the start; None before the first step."""
        done = self.step - self._start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self._start_time) / done * (self.total - self.step)

    def _eta_text(self) -> str:
        eta = self.eta_s()
        return "eta ?" if eta is None else f"eta {format_duration(eta)}"

    def update(self, step: int) -> None:
        """Note that `step` steps are done; redraw the bar if it is time to."""
        self.step = step
        now = time.perf_counter()
        if self.bar and (now - self._last_draw >= REDRAW_S or step >= self.total):
            self._last_draw = now
            self._draw()

    def _draw(self) -> None:
        filled = BAR_WIDTH * self.step // max(1, self.total)
        elapsed = format_duration(time.perf_counter() - self._start_time)
        self.stream.write(
            f"\r\033[K[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            f"{self.step}/{self.total} {elapsed} {self._eta_text()}"
        )
        self.stream.flush()

    def write(self, line: str, with_eta: bool = True) -> None:
        """Print a line: above the bar on a terminal, else followed by the step count and ETA."""
        if not self.enabled:
            return
        if self.bar:
            self.stream.write(f"\r\033[K{line}\n")
            self._draw()
        else:
            suffix = f" | {self.step}/{self.total} {self._eta_text()}" if with_eta else ""
            self.stream.write(f"{line}{suffix}\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.bar:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
