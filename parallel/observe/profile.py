"""torch.profiler over a range of steps on chosen ranks: one Chrome/Perfetto trace per rank with
the CPU memory profile, and on CUDA the caching allocator's memory history as a snapshot
with its history over the range, written at the range's end; an out-of-memory error inside the
range writes the allocator's state at that moment too."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def trace_path(folder: Path, rank: int, first: int, last: int) -> Path:
    """Where rank's trace of steps first..last goes."""
    return folder / "profile" / f"trace-rank{rank}-steps{first}-{last}.json"


class StepProfiler:
    """Profiles steps first..last (1-based, as the step counter reads after them) of one rank."""

    def __init__(
        self, folder: Path, rank: int, first: int, last: int, device: torch.device, memory: bool
    ) -> None:
        self.folder, self.rank, self.first, self.last = folder, rank, first, last
        self.cuda, self.memory = device.type == "cuda", memory
        self._prof: profile | None = None
        self.written: list[Path] = []

    def before_step(self, step: int) -> None:
        """Start when the next step (`step`) is the range's first."""
        if step != self.first:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._prof = profile(activities=activities, profile_memory=self.memory, record_shapes=True)
        self._prof.__enter__()
        if self.cuda and self.memory:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
            torch._C._cuda_attach_out_of_memory_observer(self._on_oom)  # type: ignore[attr-defined]

    def _snapshot(self, name: str) -> Path:
        path = self.folder / "profile" / f"{name}-rank{self.rank}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        return path

    def _on_oom(self, *_: object) -> None:
        self.written.append(self._snapshot("oom-memory"))

    def after_step(self, step: int) -> list[Path]:
        """Stop and write after the range's last step; returns the files written."""
        if self._prof is None or step != self.last:
            return []
        self._prof.__exit__(None, None, None)
        path = trace_path(self.folder, self.rank, self.first, self.last)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(path))
        self._prof = None
        self.written.append(path)
        if self.cuda and self.memory:
            self.written.append(self._snapshot("memory"))
            torch.cuda.memory._record_memory_history(enabled=None)
        return self.written
