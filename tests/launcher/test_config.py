"""One source of defaults: the typed schema; conf/ YAML holds only what a flavor changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.config import Config
from launcher.run.compose import CONF_DIR, compose_config

GROUPS = ("model", "data", "parallel")


@pytest.mark.parametrize(
    "path",
    sorted(p for g in GROUPS for p in (CONF_DIR / g).glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_group_files_repeat_no_schema_default(path: Path) -> None:
    defaults = getattr(Config(), path.parent.name)
    values = yaml.safe_load(path.read_text()) or {}
    repeated = [k for k, v in values.items() if v != "???" and getattr(defaults, k) == v]
    assert not repeated, f"{path} repeats schema defaults {repeated}: delete them there"


def test_default_run_is_the_schema_defaults() -> None:
    assert compose_config([]) == Config()  # editing a dataclass default changes the default run


def test_root_config_sets_no_values() -> None:
    root = yaml.safe_load((CONF_DIR / "config.yaml").read_text())
    assert set(root) == {"defaults", "hydra"}, "values belong in launcher/config.py's schema"
