"""What a checkpoint holds, by full-model name: model and optimizer tensors, and the JSON-able rest.

A rank may own several pipeline chunks sharing one optimizer, and torch's state-dict helpers
(`get_model_state_dict`, `get_optimizer_state_dict`) want one module holding every parameter
that optimizer updates. So the chunks are viewed as one `nn.ModuleList`, whose keys carry a
chunk index (`1.layers.4.attention.wq.weight`); dropping that index gives the full-model name,
which is the same in every layout. That name is the key on disk, and DCP's planner reshards
DTensor/FSDP/TP state by it.

A tied head (`output.weight` under model.tie_embeddings) is the embedding's matrix: it is stored
once, as `tok_embeddings.weight` (and its optimizer state likewise); on load, the head's copy on
a stage without the embedding reads that name, and a copy beside it (one module, or a V rank's
two chunks) takes the same values.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from models.decoder import TIED_PARAMETERS
from parallel.parallelize import ParallelModel

# what save and load take as "the model": a ParallelModel or its chunks (TorchTitan's model_parts)
ModelParts: TypeAlias = ParallelModel | Sequence[nn.Module]

# flattened: {"state.<key>.exp_avg": tensor, ..., "param_groups.<key>.lr": 0.001, ...}
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded; the message names the file or tensor."""


@dataclass
class TensorState:
    """One kind of state as {full-model name: tensor}, with the way back to torch's keys."""

    tensors: dict[str, torch.Tensor]
    torch_keys: dict[str, str]  # full-model name -> key in torch's state dict of the chunk list
    # a tied copy beside the tensor it shares: torch key -> that tensor's full-model name
    aliases: dict[str, str] = field(default_factory=dict)
    # full-model names held here as the head's copy of the tied matrix, stored by stage 0
    copies: set[str] = field(default_factory=set)

    @property
    def stored(self) -> dict[str, torch.Tensor]:
        """What a save writes from this rank: every tensor but another stage's tied copies."""
        return {name: t for name, t in self.tensors.items() if name not in self.copies}

    def as_torch_state(self, rest: dict[str, Any] | None = None) -> dict[str, Any]:
        """The tensors under torch's keys again (plus non-tensor entries), for set_*_state_dict;
        a tied copy gets its own clone of the values (optimizer state must not be shared)."""
        state = {self.torch_keys[name]: t for name, t in self.tensors.items()}
        state |= {key: self.tensors[name].clone() for key, name in self.aliases.items()}
        return {**(rest or {}), **state}


def _chunk_list(model: ModelParts) -> nn.ModuleList:
    return nn.ModuleList(model.chunks if isinstance(model, ParallelModel) else model)


def _tied(model: ModelParts) -> bool:
    args = getattr(_chunk_list(model)[0], "args", None)
    return bool(getattr(args, "tie_embeddings", False))


def _tied_source(name: str) -> str | None:
    """The stored name of a tied copy's tensor (`output.weight.exp_avg` -> `tok_embeddings...`)."""
    for copy, source in TIED_PARAMETERS.items():
        if name == copy or name.startswith(copy + "."):
            return source + name[len(copy) :]
    return None


def _by_full_name(flat: dict[str, Any], chunk_index_at: int, tied: bool) -> TensorState:
    """Drop the chunk index (dot-separated part number `chunk_index_at`) from every key; a tied
    copy goes under its source's name, or becomes an alias of the source held here."""
    state = TensorState({}, {})
    copies = []
    for key, value in flat.items():
        parts = key.split(".")
        name = ".".join(parts[:chunk_index_at] + parts[chunk_index_at + 1 :])
        if tied and _tied_source(name) is not None:
            copies.append((key, name))
            continue
        if name in state.tensors:
            raise CheckpointError(f"two local chunks both hold {name!r}: a wrong pipeline split")
        state.tensors[name], state.torch_keys[name] = value, key
    for key, name in copies:
        source = _tied_source(name)
        assert source is not None
        if source in state.tensors:
            state.aliases[key] = source
        else:
            state.tensors[source], state.torch_keys[source] = flat[key], key
            state.copies.add(source)
    return state


def model_state(model: ModelParts) -> TensorState:
    """This rank's parameters (DTensors where sharded), by full-model name."""
    return _by_full_name(get_model_state_dict(_chunk_list(model)), 0, _tied(model))


def load_model_state(model: ModelParts, state: TensorState) -> None:
    """Copy loaded parameters into the chunks (every local parameter must be present)."""
    set_model_state_dict(_chunk_list(model), state.as_torch_state())


def optimizer_state(model: ModelParts, optimizer: torch.optim.Optimizer) -> TensorState:
    """The optimizer's per-parameter tensors by `<full-model name>.<state name>`.

    On an optimizer that never stepped, torch first creates its state with one zero-lr step
    (leaves the weights unchanged), so a fresh trainer yields the tensors a load fills in.
    The param_groups entries are left out: they are not tensors (see param_group_settings).
    """
    flat = get_optimizer_state_dict(_chunk_list(model), optimizer, options=_FLAT)
    state: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        if not key.startswith("state."):
            continue
        if not isinstance(value, torch.Tensor):  # AdamW's `step` is a tensor; a plain int is not
            raise CheckpointError(
                f"optimizer state {key!r} is not a tensor but {type(value).__name__}"
            )
        state[key.removeprefix("state.")] = value
    return _by_full_name(state, 0, _tied(model))


def load_optimizer_state(
    model: ModelParts, optimizer: torch.optim.Optimizer, state: TensorState
) -> None:
    """Put loaded optimizer tensors back; param_groups keep their current settings here.

    DCP has usually filled the optimizer's own tensors in place already (the state dict holds
    them, not copies); loading through torch's helper does not depend on that.
    """
    chunks = _chunk_list(model)
    current = get_optimizer_state_dict(chunks, optimizer, options=_FLAT)
    groups = {k: v for k, v in current.items() if k.startswith("param_groups.")}
    tensors = {f"state.{k}": v for k, v in state.as_torch_state().items()}
    set_optimizer_state_dict(chunks, optimizer, {**groups, **tensors}, options=_FLAT)


def param_group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Hyperparameters of each param group (lr, betas, ...), by group index, for JSON.

    Written by hand: DCP's safetensors storage holds only tensors. The groups are the same on
    every rank and layout (the trainer builds decay / no-decay), so group order identifies them.
    """
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def restore_param_group_settings(
    optimizer: torch.optim.Optimizer, saved: list[dict[str, Any]]
) -> None:
    """Set each group's saved hyperparameters (JSON lists become tuples where torch had tuples)."""
    if len(saved) != len(optimizer.param_groups):
        raise CheckpointError(
            f"checkpoint has {len(saved)} optimizer param groups, this optimizer "
            f"{len(optimizer.param_groups)}"
        )
    for group, settings in zip(optimizer.param_groups, saved):
        for key, value in settings.items():
            group[key] = tuple(value) if isinstance(group.get(key), tuple) else value


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """This rank's random generators (torch CPU/CUDA, Python, numpy) as JSON-able values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # the tuple form
    state: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "python": [version, list(internal), gauss],
        "numpy": [name, np.asarray(keys).tolist(), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state returned."""
    torch.set_rng_state(_unb64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))
