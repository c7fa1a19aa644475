"""Loading a checkpoint into any (dp, pp, tp, v) layout, after checking every file and tensor.

Every rank checks sizes (and a share of the CRC32s) and the names and shapes against its own
model, and the problems are gathered so that all ranks raise the same CheckpointError together
instead of some hanging in a collective. DCP's planner then reshards by full-model name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from parallel.checkpoint.backends import storage_for
from parallel.checkpoint.format import MANIFEST, file_problems, part_tensors, read_manifest
from parallel.checkpoint.state import (
    CheckpointError,
    ModelParts,
    TensorState,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    restore_param_group_settings,
    set_rng_state,
)
from parallel.checkpoint.storage import Location, as_location

__all__ = ["load_checkpoint"]


def _file_problems(path: Location, manifest: dict[str, Any], verify: bool) -> list[str]:
    """Missing, resized or unlisted shard files (checked by all ranks); CRCs of this rank's share."""
    rank, world = dist.get_rank(), dist.get_world_size()
    # each rank reads a share, so the checkpoint is read once
    share = sorted(manifest["files"])[rank::world] if verify else []
    return file_problems(path, manifest, verify=share)


def _all_problems(local: list[str]) -> list[str]:
    """Every rank's problems, so that all raise together instead of some hanging in a collective."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return sorted({p for rank_problems in everyone for p in rank_problems})


def _raise_if_any(path: Location, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"cannot load {path}: " + "; ".join(problems[:5]) + more)


def _load_part(directory: Location, state: TensorState, what: str) -> None:
    """Fill `state` in place from one DCP part, after checking names and shapes on all ranks."""
    saved = part_tensors(directory)
    problems = []
    for name, tensor in state.tensors.items():
        if name not in saved:
            problems.append(f"{what} tensor {name!r} is not in the checkpoint")
        elif tuple(saved[name].size) != tuple(tensor.shape):
            problems.append(
                f"{what} tensor {name!r} has shape {list(saved[name].size)} in the "
                f"checkpoint but {list(tensor.shape)} in this model"
            )
    # names no rank of this model has mean the checkpoint is of another model
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (problems, sorted(state.tensors)))
    problems = sorted({p for rank_problems, _ in everyone for p in rank_problems})
    unknown = sorted(set(saved) - {n for _, names in everyone for n in names})
    if unknown:
        problems.append(
            f"it holds {len(unknown)} {what} tensors this model lacks, e.g. "
            f"{unknown[:3]}: a checkpoint of another model?"
        )
    _raise_if_any(directory, problems)
    try:
        dcp.load(state.tensors, storage_reader=storage_for(directory).dcp_reader(directory))
    except CheckpointException as err:  # raised on every rank: DCP gathers failures
        raise CheckpointError(f"{directory}: reading the shards failed: {err}") from None


def load_checkpoint(
    path: Location,
    model: ModelParts,
    optimizer: torch.optim.Optimizer,
    states: Mapping[str, Stateful],
    layout: dict[str, Any],
    verify: bool = True,
) -> dict[str, Any]:
    """Restore what save_checkpoint wrote into model, optimizer and `states`, whatever the layout.

    Every rank must call it. Returns the manifest (format 2's shape, whichever format was read):
    the caller takes its step from manifest["step"]; "extra" is what the saver passed.
    states: each is filled by load_state_dict from the entry of that name (a checkpoint may hold
    more). layout: this run's, as the saver passed it; when it equals the saved one each rank gets
    its own RNG state back. verify: also check each shard's CRC32 (each rank reads a share).
    """
    path = as_location(path)
    storage = storage_for(path)
    manifest_path = storage.join(path, MANIFEST)
    manifest = read_manifest(path)
    missing = sorted(set(states) - set(manifest["states"]))
    if missing:  # the manifest is the same on every rank, so all raise here together
        raise CheckpointError(
            f"{manifest_path}: no state {missing} (it holds {sorted(manifest['states'])})"
        )
    _raise_if_any(path, _all_problems(_file_problems(path, manifest, verify)))
    # optimizer tensors first: creating them on a fresh optimizer takes a zero-lr step
    optim = optimizer_state(model, optimizer)
    tensors = model_state(model)
    _load_part(storage.join(path, "model"), tensors, "model")
    _load_part(storage.join(path, "optim"), optim, "optimizer")
    load_model_state(model, tensors)
    load_optimizer_state(model, optimizer, optim)
    restore_param_group_settings(optimizer, manifest["optimizer_param_groups"])
    for name, obj in states.items():
        try:
            obj.load_state_dict(manifest["states"][name])
        except (ValueError, KeyError) as err:  # e.g. the sampler's data changed since the save
            raise CheckpointError(f"{manifest_path}: state {name!r}: {err}") from None
    # per-rank generators carry over only to the same layout; otherwise every rank takes rank 0's
    rng = manifest["rng"]
    rank = dist.get_rank() if manifest["layout"] == layout else 0
    try:  # read_manifest checked the shape of "rng", not each generator's state
        set_rng_state(rng["states"][rng["of_rank"][rank]])
    except (IndexError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{manifest_path}: rng state of rank {rank}: {type(err).__name__}: {err}"
        ) from None
    return manifest
