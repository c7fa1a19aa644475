"""Compose the real Hydra config with overrides and train on the current ranks (used by tests)."""

from __future__ import annotations

import torch

from data import validation_batches
from launcher.config import Config
from launcher.run.build import load_data
from launcher.run.compose import compose_config
from launcher.run.loop import train
from parallel.parallelize import full_state_dict

# a run of a few seconds a step on gloo ranks: the debug model, tiny batches, no sample or checkpoint
TINY_RUN = [
    "model=debug",
    "train.global_batch_size=4",
    "train.seq_len=16",
    "train.sample_tokens=0",
    "train.log_interval=100",
    "checkpoint.final=false",
]


def make_config(overrides: list[str], world_size: int = 1) -> Config:
    """The validated config `python -m launcher.train *overrides` would use."""
    return compose_config(overrides, world_size)


def train_and_report(
    overrides: list[str], world_size: int
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step losses and the final full weights this rank holds."""
    cfg = make_config(overrides, world_size)
    summary = train(cfg, load_data(cfg))
    assert summary.trainer is not None
    return summary.losses, full_state_dict(summary.trainer.model)


def train_validate_and_report(
    overrides: list[str], world_size: int
) -> tuple[list[float], dict[str, torch.Tensor], float]:
    """As train_and_report, plus the validation loss after training (through eval schedules)."""
    cfg = make_config(overrides, world_size)
    tokens = load_data(cfg)
    summary = train(cfg, tokens)
    trainer = summary.trainer
    assert trainer is not None
    val = validation_batches(
        tokens.val,
        cfg.train.seq_len,
        cfg.train.global_batch_size,
        cfg.train.val_batches,
        trainer.model.mesh["dp"].get_local_rank(),
        cfg.parallel.dp,
    )
    val_loss = trainer.global_mean(trainer.evaluate(val)).item()
    return summary.losses, full_state_dict(trainer.model), val_loss
