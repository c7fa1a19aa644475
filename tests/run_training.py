"""Compose the real Hydra config with overrides and train on the current ranks (used by tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from data import validation_batches
from launcher.config import Config, load_config, validate
from launcher.train import load_data, train
from parallel.parallelize import full_state_dict

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def make_config(overrides: list[str], world_size: int = 1) -> Config:
    """The validated config `python -m launcher.train *overrides` would use."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = load_config(compose("config", overrides=overrides))
    validate(cfg, world_size)
    return cfg


def train_and_report(overrides: list[str], world_size: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step losses and the final full weights this rank holds."""
    cfg = make_config(overrides, world_size)
    summary = train(cfg, load_data(cfg))
    return summary.losses, full_state_dict(summary.trainer.model)


def train_validate_and_report(
    overrides: list[str], world_size: int
) -> tuple[list[float], dict[str, torch.Tensor], float]:
    """As train_and_report, plus the validation loss after training (through eval schedules)."""
    cfg = make_config(overrides, world_size)
    tokens = load_data(cfg)
    summary = train(cfg, tokens)
    trainer = summary.trainer
    val = validation_batches(tokens.val, cfg.train.seq_len, cfg.train.global_batch_size,
                             cfg.train.val_batches, trainer.model.mesh["dp"].get_local_rank(),
                             cfg.parallel.dp)
    val_loss = trainer.global_mean(trainer.evaluate(val)).item()
    return summary.losses, full_state_dict(trainer.model), val_loss
