"""The config a command line composes: Hydra's conf/ tree merged onto the typed schema."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

from hydra import compose, initialize_config_dir

import launcher.config as schema
from launcher.config import Config, ConfigError, load_config, register_schema
from launcher.validate import validate

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CONFIG_GROUPS = ("model", "data", "parallel")
# the schema's annotations are strings (postponed evaluation): its section classes by name
_SECTIONS = {name: cls for name, cls in vars(schema).items() if dataclasses.is_dataclass(cls)}
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


def schema_keys() -> set[str]:
    """Every dotted key of the typed schema (`train.steps`, `logging.wandb.enabled`, ...)."""
    keys: set[str] = set()

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            sub = f.type if isinstance(f.type, type) else _SECTIONS.get(str(f.type))
            if isinstance(sub, type) and dataclasses.is_dataclass(sub):
                walk(sub, f"{prefix}{f.name}.")
            else:
                keys.add(f"{prefix}{f.name}")

    walk(Config, "")
    return keys


def check_keys(argv: list[str]) -> None:
    """Refuse an override of a key the schema does not have (`train.step=5`, `+train.step=5`),
    suggesting the nearest real one; Hydra's own message names no alternative."""
    keys = schema_keys()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg and not arg.startswith("~"):
            continue  # flags (-m, --cfg job) and bare words are Hydra's
        key, _, value = arg.lstrip("+~").partition("=")
        if key.split(".")[0].split("/")[0] == "hydra" or key in CONFIG_GROUPS or key in MOVED_KEYS:
            continue
        if key not in keys:
            near = difflib.get_close_matches(key, sorted(keys), n=1)
            hint = f"did you mean {near[0]}?" if near else "see launcher/config.py for every key"
            raise ConfigError(key, value or None, f"no such config key; {hint}")


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
