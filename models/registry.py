"""model.family -> its ModelSpec: the package models/<family>/ exports it as `SPEC`.

A family is found by its folder, so adding one edits no list here; `register` adds one from
elsewhere (a test defines a toy family in its own file).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from models.args import ModelArgs
from models.spec import ModelSpec

_REGISTERED: dict[str, ModelSpec] = {}
_PACKAGE = Path(__file__).parent


def register(spec: ModelSpec) -> ModelSpec:
    """Make `spec` the family `spec.family` (replacing one registered under that name)."""
    _REGISTERED[spec.family] = spec
    return spec


def families() -> list[str]:
    """Every family there is: the packages under models/ with a SPEC, and registered ones."""
    found = {m.name for m in pkgutil.iter_modules([str(_PACKAGE)]) if m.ispkg}
    return sorted(found | set(_REGISTERED))


def model_spec(family: str) -> ModelSpec:
    """The spec of `family`; KeyError (naming the families there are) if there is none."""
    if family not in _REGISTERED:
        if family.isidentifier() and family in families():
            module = importlib.import_module(f"models.{family}")
            spec = getattr(module, "SPEC", None)
            if isinstance(spec, ModelSpec) and spec.family == family:
                _REGISTERED[family] = spec
    if family not in _REGISTERED:
        raise KeyError(f"no model family {family!r}; there are: {', '.join(families())}")
    return _REGISTERED[family]


def parameter_count(args: ModelArgs) -> int:
    """Parameters of the whole model `args` describes, by its family's arithmetic."""
    return model_spec(args.family).parameter_count(args)
