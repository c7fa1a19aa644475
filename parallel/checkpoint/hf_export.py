"""Export a tridist checkpoint (any layout) to its family's Hugging Face layout, on one process.

Full tensors are assembled from the per-rank shards by DCP itself (`dcp.load(no_dist=True)`
into full-size tensors), a group of tensors at a time so memory stays near one output file.
A stacked expert tensor is written as the family's per-expert Hugging Face tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from models.hf import INDEX, SINGLE_FILE, HFFormatError
from models.registry import model_spec
from parallel.checkpoint.backends import storage_for
from parallel.checkpoint.format import file_problems, model_args_of, part_tensors, read_manifest
from parallel.checkpoint.state import CheckpointError
from parallel.checkpoint.storage import Location, as_location

DEFAULT_SHARD_BYTES = 5 * 2**30  # Hugging Face's default max_shard_size


def _groups(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Names in order, cut into consecutive groups of at most `limit` bytes (one tensor at least)."""
    groups: list[list[str]] = [[]]
    total = 0
    for name, size in sizes.items():
        if groups[-1] and total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += size
    return groups


def export_to_hf(
    checkpoint: Location,
    out: Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write config.json and the weights (sharded with an index when over max_shard_bytes).

    Returns the safetensors files written. dtype: cast the weights (default: as saved).
    The checkpoint is read through its storage (a path or an fsspec URL); `out` is local.
    """
    checkpoint, out = as_location(checkpoint), Path(out)
    model_dir = storage_for(checkpoint).join(checkpoint, "model")
    manifest = read_manifest(checkpoint)  # refuses file names outside the checkpoint
    # the model files are the manifest's and whole (unlisted, missing, resized or corrupt ones
    # refused) before the reader opens any; the optimizer part is not needed
    model_files = [rel for rel in manifest["files"] if rel.startswith("model/")]
    if problems := file_problems(checkpoint, manifest, parts=("model",), verify=model_files):
        raise CheckpointError(f"cannot export {checkpoint}: " + "; ".join(problems))
    # the manifest's "model" entry (format 1's config.model, upgraded by read_manifest)
    args = model_args_of(manifest)
    hf = model_spec(args.family).hf  # the family's Hugging Face names and config.json
    meta = part_tensors(model_dir)
    names = sorted(meta, key=_export_order)
    saved_dtype = meta[names[0]].properties.dtype
    dtype = dtype or saved_dtype
    try:  # before writing anything: a model the Hugging Face class cannot hold is refused
        config = hf.config(args, dtype)
    except HFFormatError as err:
        raise CheckpointError(f"cannot export {checkpoint}: {err}") from None
    sizes = {n: meta[n].size.numel() * dtype.itemsize for n in names}
    groups = _groups(sizes, max_shard_bytes)
    out.mkdir(parents=True, exist_ok=True)
    files = [
        out
        / (
            SINGLE_FILE
            if len(groups) == 1
            else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        )
        for i in range(len(groups))
    ]
    weight_map = {}
    for group, path in zip(groups, files):
        full = {n: torch.empty(meta[n].size, dtype=meta[n].properties.dtype) for n in group}
        reader = storage_for(model_dir).dcp_reader(model_dir)
        dcp.load(full, storage_reader=reader, no_dist=True)
        tensors = {
            key: t.to(dtype).contiguous()
            for n, full_tensor in full.items()
            for key, t in hf.to_hf_tensors(n, full_tensor, args).items()
        }
        tmp = path.with_name(f".tmp-{path.name}")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.chmod(_new_file_mode())  # safetensors creates 0600; others on a cluster read exports
        shutil.move(tmp, path)
        weight_map.update(dict.fromkeys(tensors, path.name))
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out / INDEX).write_text(json.dumps(index, indent=2))
    if not args.tie_embeddings and "lm_head.weight" not in weight_map:
        raise CheckpointError(f"{checkpoint}: no output.weight in the checkpoint")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return files


def _new_file_mode() -> int:
    """The mode an ordinary new file gets here: 0666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it; put it straight back
    return 0o666 & ~umask


def _export_order(name: str) -> tuple[int, str]:
    """Embedding first, then layers in numeric order, then the final norm and head."""
    if name.startswith("layers."):
        return int(name.split(".")[1]) + 1, name
    return (0 if name.startswith("tok_embeddings") else 1 << 30), name
