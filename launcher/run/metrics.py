"""Metrics sinks (rank 0 only): a compact console line, metrics.jsonl (always), wandb and
TensorBoard when enabled in `logging`.

wandb runs online when WANDB_API_KEY is set and offline otherwise (WANDB_MODE, when set, wins),
writing under <run dir>/wandb/; its run config is the whole resolved config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# console: (record key, label, format); everything else goes to the files only
CONSOLE_FIELDS = (
    ("step", "step", "{}"),
    ("loss", "loss", "{:.4f}"),
    ("val_loss", "val", "{:.4f}"),
    ("lr", "lr", "{:.2e}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("moe/aux_loss", "aux", "{:.4f}"),  # MoE: the router's auxiliary losses
    ("moe/load_max_over_mean", "expert_load", "{:.2f}"),  # busiest expert / mean, worst layer
    ("tokens_per_s", "tok/s", "{:,.0f}"),
    ("tokens_per_s_per_device", "tok/s/dev", "{:,.0f}"),
    ("step_time_s", "step_s", "{:.3f}"),
    ("data_wait_s", "data_s", "{:.4f}"),
    ("mfu", "mfu", "{:.2%}"),
    ("peak_memory_gib", "mem_gib", "{:.2f}"),
)


def console_line(record: dict[str, Any]) -> str:
    """The record's main fields on one short line: `step=10 loss=2.3456 lr=3.00e-03 ...`."""
    return " ".join(
        f"{label}={fmt.format(record[key])}"
        for key, label, fmt in CONSOLE_FIELDS
        if record.get(key) is not None
    )


class WandbSink:
    """One wandb run; online with WANDB_API_KEY, offline otherwise."""

    def __init__(
        self,
        run_dir: Path,
        project: str,
        entity: str | None,
        name: str | None,
        config: dict[str, Any],
    ) -> None:
        import wandb  # only when enabled: importing wandb takes about a second

        mode: Any = os.environ.get("WANDB_MODE") or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline"
        )
        # WANDB_MODE is the user's to set; wandb itself refuses a value it does not know
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name or run_dir.name,
            dir=str(run_dir),
            config=config,
            mode=mode,
        )

    def log(self, record: dict[str, Any]) -> None:
        """Log the record at its step."""
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        """Finish the run and wait until its files are complete."""
        import wandb

        self.run.finish()
        # finish() can return before the wandb-core service has written the run's .wandb file;
        # teardown waits for the service, so the files are whole when training returns
        wandb.teardown()


class TensorBoardSink:
    """Scalars under <run dir>/tensorboard (needs the `tensorboard` package: tridist[tensorboard])."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "logging.tensorboard=true needs the tensorboard package: "
                "pip install 'tridist[tensorboard]' (or set it to false)"
            ) from err
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        """One scalar per numeric field."""
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self.writer.close()


class MetricsLogger:
    """Writes each logged step to every enabled sink; does nothing on ranks other than 0."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        *,
        wandb: dict[str, Any] | None = None,
        tensorboard: bool = False,
        console: Callable[[str], None] = print,
    ) -> None:
        """wandb: WandbSink's keyword arguments (project, entity, name, config), or None for off."""
        self.enabled, self.console = enabled, console
        self._file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self._sinks: list[WandbSink | TensorBoardSink] = []
        if enabled and wandb is not None:
            self._sinks.append(WandbSink(run_dir, **wandb))
        if enabled and tensorboard:
            self._sinks.append(TensorBoardSink(run_dir))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl, send it to the sinks and print its main fields."""
        if self._file is None:  # not rank 0, or no run folder
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for sink in self._sinks:
            sink.log(record)
        self.console(console_line(record))

    def close(self) -> None:
        """Close the file and finish the sinks."""
        if self._file is not None:
            self._file.close()
        for sink in self._sinks:
            sink.close()
