"""What a checkpoint is on disk: its names, finding the newest, checksums, and the manifest.

    root/step-00000100/
        model/shard-0000R-model-00001-of-00001.safetensors   one file per writing rank (DCP)
        optim/shard-0000R-model-00001-of-00001.safetensors   optimizer tensors (<name>.exp_avg, ...)
        manifest.json     written LAST; see below
    root/latest           "step-00000100": moved only after a complete save (for people and tools)

manifest.json, format "tridist-checkpoint-2":
    format, step, tokens_seen, torch_version
    model                   the architecture: every models.llama.ModelArgs field
    layout                  the (dp, pp, tp, v, schedule, ...) it was saved in
    config                  the saver's resolved config (parallel/checkpoint never reads it)
    states                  {name: state_dict()} of each generic state (sampler, lr_scheduler)
    optimizer_param_groups  lr, betas, ... of each param group
    extra, rng, files       the saver's extras; RNG states; every shard's bytes and CRC32

Format 1 (before the architecture had its own entry) is still read: read_manifest turns it into
the shape above, so nothing after it looks at the version.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from models.llama import ModelArgs
from parallel.checkpoint.state import CheckpointError

FORMAT = "tridist-checkpoint-2"
FORMAT_V1 = "tridist-checkpoint-1"  # top-level sampler/lr_scheduler, architecture in config.model
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
PARTS = ("model", "optim")  # one DCP save each, into a subdirectory of that name


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"{STEP_PREFIX}{step:08d}"


def _step_of(path: Path) -> int | None:
    digits = path.name.removeprefix(STEP_PREFIX)
    return int(digits) if path.name.startswith(STEP_PREFIX) and digits.isdigit() else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints under root, oldest first (.tmp dirs and manifest-less ones skipped)."""
    if not root.is_dir():
        return []
    steps = {p: step for p in root.iterdir()
             if (step := _step_of(p)) is not None and (p / MANIFEST).is_file()}
    return sorted(steps, key=steps.__getitem__)


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root, or None.

    Scans the step-* directories rather than trusting `latest`: a job killed between the
    rename and the pointer update leaves `latest` one checkpoint behind (or missing).
    """
    complete = complete_checkpoints(Path(root))
    return complete[-1] if complete else None


def find_checkpoint(path: Path) -> Path:
    """`path` itself if it is a checkpoint, else the newest checkpoint under it (a root)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if (latest := find_latest(path)) is None:
        raise CheckpointError(f"{path}: no complete checkpoint (with {MANIFEST}) there; name a "
                              f"{STEP_PREFIX}XXXXXXXX folder or a folder holding them")
    return latest


def resume_path(resume: str, root: Path | None) -> Path | None:
    """What `train.resume` names: none -> None; auto -> the newest checkpoint under root (None if
    there is none yet); a path -> that checkpoint, or the newest one under a checkpoint root."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(root) if root is not None else None
    try:
        return find_checkpoint(Path(resume))
    except CheckpointError as err:
        raise CheckpointError(f"train.resume={err}") from None


def file_crc32(path: Path) -> int:
    """CRC32 of a file's bytes, read in 16 MiB blocks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def shard_files(directory: Path) -> list[str]:
    """Every file of the DCP parts, relative to `directory`, in one order all ranks agree on."""
    return sorted(str(p.relative_to(directory)) for part in PARTS
                  for p in (directory / part).glob("*") if p.is_file())


def part_tensors(directory: Path) -> dict[str, TensorStorageMetadata]:
    """Each tensor's saved size and dtype in one DCP part, from its safetensors headers."""
    try:
        saved = HuggingFaceStorageReader(str(directory)).read_metadata().state_dict_metadata
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{directory}: cannot read the safetensors headers: {err}") from None
    # safetensors storage holds tensors only: DCP's bytes entries never appear in it
    return {name: m for name, m in saved.items() if isinstance(m, TensorStorageMetadata)}


def model_entry(args: ModelArgs) -> dict[str, Any]:
    """The manifest's "model" entry: every ModelArgs field, by name (and only those: a subclass,
    such as the launcher's model config, also carries build settings)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelArgs)}


def model_args_of(manifest: dict[str, Any]) -> ModelArgs:
    """The architecture a checkpoint was saved with (a manifest from read_manifest)."""
    entry = manifest["model"]
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    # a field this code does not know would be dropped silently and build another model
    if unknown := sorted(set(entry) - fields):
        raise CheckpointError(f"manifest model entry has fields this code lacks: {unknown}; "
                              "saved by a newer tridist?")
    return ModelArgs(**entry)


def _upgrade_v1(manifest: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest in format 2's shape ("format" still says 1, for whoever asks)."""
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    # format 1 kept the architecture only inside the config's model group (with build settings)
    model = {k: v for k, v in manifest["config"]["model"].items() if k in fields}
    states = {name: manifest.pop(name) for name in ("sampler", "lr_scheduler")}
    return {**manifest, "model": model, "states": states}


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the checkpoint directory `path`, in the current format's shape."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}; not a checkpoint, or an interrupted save")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({err})") from None
    version = manifest.get("format") if isinstance(manifest, dict) else None
    try:
        if version == FORMAT_V1:
            return _upgrade_v1(manifest)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: format {FORMAT_V1!r} without {err}") from None
    if version != FORMAT:
        raise CheckpointError(f"{manifest_path}: format {version!r}, expected {FORMAT!r} "
                              f"(or the older {FORMAT_V1!r})")
    return manifest
