"""Metrics sinks: a compact console line and metrics.jsonl in the run directory (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    """Writes one JSON object per logged step; does nothing on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self._file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115

    def log(self, record: dict[str, float | int]) -> None:
        """Print and append one record."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        print(" ".join(_format(k, v) for k, v in record.items()), flush=True)

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()


def _format(key: str, value: float | int) -> str:
    if isinstance(value, float):
        return f"{key}={value:.4g}" if abs(value) < 1e4 else f"{key}={value:,.0f}"
    return f"{key}={value}"
