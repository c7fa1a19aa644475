"""The machine a benchmark ran on, printed above its table."""

from __future__ import annotations

import os

import torch


def machine() -> str:
    """CPU model, cores, torch version, intra-op threads and load average, on one line."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} (1 min)"
    )
