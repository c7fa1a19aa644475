"""The config a command line composes: Hydra's conf/ tree merged onto the typed schema."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from launcher.config import Config, ConfigError, load_config, register_schema
from launcher.validate import validate

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CONFIG_GROUPS = ("model", "data", "parallel")
MOVED_KEYS = {"cluster.peak_tflops": "hardware.peak_tflops"}  # one key for MFU and the planner


def compose_config(
    overrides: list[str], world_size: int | None = None, ranks_per_node: int | None = None
) -> Config:
    """The typed config `python -m launcher.train *overrides` would use; validated for
    `world_size` ranks when given. `hydra.*` overrides are dropped (they steer Hydra only)."""
    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = load_config(
            compose("config", overrides=[o for o in overrides if not o.startswith("hydra.")])
        )
    if world_size is not None:
        validate(cfg, world_size, ranks_per_node)
    return cfg


def check_group_choices(argv: list[str]) -> None:
    """Refuse an unknown flavor (`model=llama3_9b`) with the list of known ones, and a key that
    moved with its new name."""
    for arg in argv:
        group, _, choice = arg.partition("=")
        if group.lstrip("+~") in MOVED_KEYS:
            raise ConfigError(group, choice, f"this key is now {MOVED_KEYS[group.lstrip('+~')]}")
        if group not in CONFIG_GROUPS or not choice:
            continue
        unknown = [
            c for c in choice.split(",") if not (CONF_DIR / group / f"{c}.yaml").is_file()
        ]  # -m a,b
        if unknown:
            known = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            raise ConfigError(
                group, unknown[0], f"unknown {group}; choose one of {', '.join(known)}"
            )
