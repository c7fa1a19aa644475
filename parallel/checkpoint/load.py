"""Loading a checkpoint into any (dp, pp, tp, v) layout, after checking every file and tensor.

Every rank checks sizes (and a share of the CRC32s) and the names and shapes against its own
model, and the problems are gathered so that all ranks raise the same CheckpointError together
instead of some hanging in a collective. DCP's planner then reshards by full-model name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader

from parallel.checkpoint.save import FORMAT, MANIFEST, file_crc32, layout_of, shard_files
from parallel.checkpoint.state import (
    CheckpointError,
    TensorState,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    restore_param_group_settings,
    set_rng_state,
)

if TYPE_CHECKING:
    from launcher.run.trainer import Trainer


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the checkpoint directory `path`, checked for its format."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; not a checkpoint, or an interrupted save")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({err})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r}, "
                              f"expected {FORMAT!r}")
    return manifest


def _file_problems(path: Path, manifest: dict[str, Any], verify: bool) -> list[str]:
    """Missing or resized shard files (checked by all ranks); CRCs of this rank's share."""
    problems = []
    listed = sorted(manifest["files"])
    for rel in listed:
        f = path / rel
        expected = manifest["files"][rel]["bytes"]
        if not f.is_file():
            problems.append(f"missing shard file {f}")
        elif (size := f.stat().st_size) != expected:
            problems.append(f"shard file {f} has {size} bytes, the manifest says {expected}: "
                            "truncated or overwritten")
    if verify and not problems:
        rank, world = dist.get_rank(), dist.get_world_size()
        for rel in listed[rank::world]:  # each rank reads a share, so the checkpoint is read once
            if file_crc32(path / rel) != manifest["files"][rel]["crc32"]:
                problems.append(f"shard file {path / rel} is corrupt: "
                                "its CRC32 differs from the manifest")
    # the safetensors reader reads every *.safetensors file it finds, listed or not
    unlisted = sorted(f for f in set(shard_files(path)) - set(listed)
                      if f.endswith(".safetensors"))
    problems += [f"unexpected file {path / rel} (not in the manifest)" for rel in unlisted]
    return problems


def _all_problems(local: list[str]) -> list[str]:
    """Every rank's problems, so that all raise together instead of some hanging in a collective."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return sorted({p for rank_problems in everyone for p in rank_problems})


def _raise_if_any(path: Path, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"cannot load {path}: " + "; ".join(problems[:5]) + more)


def _load_part(directory: Path, state: TensorState, what: str) -> None:
    """Fill `state` in place from one DCP part, after checking names and shapes on all ranks."""
    try:
        saved = HuggingFaceStorageReader(str(directory)).read_metadata().state_dict_metadata
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{directory}: cannot read the safetensors headers: {err}") from None
    problems = []
    for name, tensor in state.tensors.items():
        if name not in saved:
            problems.append(f"{what} tensor {name!r} is not in the checkpoint")
        elif tuple(saved[name].size) != tuple(tensor.shape):
            problems.append(f"{what} tensor {name!r} has shape {list(saved[name].size)} in the "
                            f"checkpoint but {list(tensor.shape)} in this model")
    # names no rank of this model has mean the checkpoint is of another model
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (problems, sorted(state.tensors)))
    problems = sorted({p for rank_problems, _ in everyone for p in rank_problems})
    unknown = sorted(set(saved) - {n for _, names in everyone for n in names})
    if unknown:
        problems.append(f"it holds {len(unknown)} {what} tensors this model lacks, e.g. "
                        f"{unknown[:3]}: a checkpoint of another model?")
    _raise_if_any(directory, problems)
    try:
        dcp.load(state.tensors, storage_reader=HuggingFaceStorageReader(str(directory)))
    except CheckpointException as err:  # raised on every rank: DCP gathers failures
        raise CheckpointError(f"{directory}: reading the shards failed: {err}") from None


def load_checkpoint(path: Path, trainer: Trainer, verify: bool = True) -> dict[str, Any]:
    """Restore everything save_checkpoint wrote into `trainer`, whatever its layout.

    Every rank must call it. Returns the manifest (its "extra" is what the saver passed).
    verify: also check each shard's CRC32 (each rank reads a share of the files).
    """
    path = Path(path)
    manifest = read_manifest(path)
    _raise_if_any(path, _all_problems(_file_problems(path, manifest, verify)))
    # optimizer tensors first: creating them on a fresh optimizer takes a zero-lr step
    optim = optimizer_state(trainer.model, trainer.optimizer)
    model = model_state(trainer.model)
    _load_part(path / "model", model, "model")
    _load_part(path / "optim", optim, "optimizer")
    load_model_state(trainer.model, model)
    load_optimizer_state(trainer.model, trainer.optimizer, optim)
    restore_param_group_settings(trainer.optimizer, manifest["optimizer_param_groups"])
    trainer.lr_scheduler.load_state_dict(manifest["lr_scheduler"])
    try:
        trainer.sampler.load_state_dict(manifest["sampler"])
    except ValueError as err:
        raise CheckpointError(f"{path / MANIFEST}: {err}") from None
    trainer.step = manifest["step"]
    # per-rank generators carry over only to the same layout; otherwise every rank takes rank 0's
    rng = manifest["rng"]
    same_layout = manifest["layout"] == layout_of(trainer)
    set_rng_state(rng["states"][rng["of_rank"][dist.get_rank() if same_layout else 0]])
    return manifest
