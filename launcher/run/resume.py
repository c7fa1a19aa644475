"""What a resumed run changes: each config key whose value differs from the checkpoint's.

Keys that steer training from here on (optimizer, LR schedule, steps, batch, logging,
checkpointing, schedule and layout) take the new value. Keys that define what was trained
(the architecture, the data, seq_len, seed) are refused unless `train.resume_allow_changes`
names them: resuming with another tokenizer or width is a new run, not a continuation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from launcher.config import Config, ConfigError

DEFINES_THE_RUN = ("model.", "data.", "train.seq_len", "train.seed")
# under model.: how the model is built or recomputed, not what it is
STEERING_EXCEPTIONS = ("model.activation_checkpointing", "model.init_from", "model.name")
IGNORED = ("train.resume", "train.resume_allow_changes")  # saying how to resume is no change


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key that differs, in key order."""
    old, new = flatten(saved), flatten(current)
    return [
        (k, old.get(k), new.get(k))
        for k in sorted(set(old) | set(new))
        if k not in IGNORED and old.get(k) != new.get(k)
    ]


def defines_the_run(key: str) -> bool:
    """True for keys that say what was trained rather than how training goes on."""
    return key.startswith(DEFINES_THE_RUN) and not key.startswith(STEERING_EXCEPTIONS)


def resume_changes(saved_config: dict[str, Any], cfg: Config) -> list[str]:
    """Check what resuming with `cfg` changes against the checkpoint's config; one line each."""
    changes = config_changes(saved_config, dataclasses.asdict(cfg))
    check_changes(changes, cfg.train.resume_allow_changes)
    return [f"  {key}: {old!r} -> {new!r}" for key, old, new in changes]


def check_changes(changes: list[tuple[str, Any, Any]], allowed: list[str]) -> None:
    """Refuse the first change of a key that defines the run, unless it is allowed."""
    for key, old, new in changes:
        if defines_the_run(key) and key not in allowed:
            raise ConfigError(
                key,
                new,
                f"the checkpoint was trained with {key}={old!r}, and this key "
                "defines what was trained; drop the override, start a new run, or "
                f"allow it with train.resume_allow_changes=[{key}]",
            )
