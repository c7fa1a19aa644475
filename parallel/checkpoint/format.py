"""What a checkpoint is on disk: its names, finding the newest, checksums, and the manifest.

    root/step-00000100/
        model/shard-0000R-model-00001-of-00001.safetensors   one file per writing rank, R = rank + 1
        optim/shard-0000R-model-00001-of-00001.safetensors   optimizer tensors (<name>.exp_avg, ...)
        manifest.json     written LAST; see below
    root/latest           "step-00000100": moved only after a complete save (for people and tools)

manifest.json, format "tridist-checkpoint-2":
    format, step, tokens_seen, torch_version
    model                   the architecture: every models.args.ModelArgs field
    layout                  the (dp, pp, tp, v, schedule, ...) it was saved in
    config                  the saver's resolved config (parallel/checkpoint never reads it)
    states                  {name: state_dict()} of each generic state (sampler, lr_scheduler)
    optimizer_param_groups  lr, betas, ... of each param group
    extra, rng, files       the saver's extras; RNG states; every shard's bytes and CRC32

Format 1 (before the architecture had its own entry) is still read: read_manifest turns it into
the shape above, so nothing after it looks at the version. Every file operation goes through
storage.py (a local path or an fsspec URL: the same layout on both).
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from models.args import ModelArgs
from parallel.checkpoint.backends import storage_for
from parallel.checkpoint.state import CheckpointError
from parallel.checkpoint.storage import Location, as_location

FORMAT = "tridist-checkpoint-2"
FORMAT_V1 = "tridist-checkpoint-1"  # top-level sampler/lr_scheduler, architecture in config.model
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
PARTS = ("model", "optim")  # written one after the other, each into a subdirectory of that name


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"{STEP_PREFIX}{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder's name (step-XXXXXXXX), or None for any other name."""
    digits = name.removeprefix(STEP_PREFIX)
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else None


def complete_checkpoints(root: Location) -> list[Location]:
    """Committed checkpoints under root, oldest first (.tmp dirs and manifest-less ones skipped)."""
    storage = storage_for(root)
    steps = {
        storage.join(root, name): step
        for name in storage.list(root)
        if (step := step_of(name)) is not None
        and storage.is_file(storage.join(root, name, MANIFEST))
    }
    return sorted(steps, key=steps.__getitem__)


def find_latest(root: Location) -> Location | None:
    """The newest complete checkpoint under root, or None.

    Scans the step-* directories rather than trusting `latest`: a job killed between the
    rename and the pointer update leaves `latest` one checkpoint behind (or missing).
    """
    complete = complete_checkpoints(as_location(root))
    return complete[-1] if complete else None


def find_checkpoint(path: Location) -> Location:
    """`path` itself if it is a checkpoint, else the newest checkpoint under it (a root)."""
    path = as_location(path)
    storage = storage_for(path)
    if storage.is_file(storage.join(path, MANIFEST)):
        return path
    if (latest := find_latest(path)) is None:
        raise CheckpointError(
            f"{path}: no complete checkpoint (with {MANIFEST}) there; name a "
            f"{STEP_PREFIX}XXXXXXXX folder or a folder holding them"
        )
    return latest


def resume_path(resume: str, root: Location | None) -> Location | None:
    """What `train.resume` names: none -> None; auto -> the newest checkpoint under root (None if
    there is none yet); a path -> that checkpoint, or the newest one under a checkpoint root."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(root) if root is not None else None
    try:
        return find_checkpoint(as_location(resume))
    except CheckpointError as err:
        raise CheckpointError(f"train.resume={err}") from None


def file_crc32(path: Location) -> int:
    """CRC32 of a file's bytes, read in 16 MiB blocks."""
    crc = 0
    with storage_for(path).open_read(path) as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def shard_files(directory: Location, parts: tuple[str, ...] = PARTS) -> list[str]:
    """Every file of the DCP parts, relative to `directory`, in one order all ranks agree on."""
    storage = storage_for(directory)
    return sorted(
        f"{part}/{name}"
        for part in parts
        for name in storage.list(storage.join(directory, part))
        if storage.is_file(storage.join(directory, part, name))
    )


def part_tensors(directory: Location) -> dict[str, TensorStorageMetadata]:
    """Each tensor's saved size and dtype in one DCP part, from its safetensors headers."""
    try:
        saved = storage_for(directory).dcp_reader(directory).read_metadata().state_dict_metadata
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
        raise CheckpointError(
            f"manifest model entry has fields this code lacks: {unknown}; saved by a newer tridist?"
        )
    return ModelArgs(**entry)


def _upgrade_v1(manifest: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest in format 2's shape ("format" still says 1, for whoever asks)."""
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    # format 1 kept the architecture only inside the config's model group (with build settings)
    model = {k: v for k, v in manifest["config"]["model"].items() if k in fields}
    states = {name: manifest.pop(name) for name in ("sampler", "lr_scheduler")}
    return {**manifest, "model": model, "states": states}


def read_manifest(path: Location) -> dict[str, Any]:
    """The manifest of the checkpoint directory `path`, in the current format's shape, checked:
    every entry later code reads has its type, and every file it names lies inside `path`."""
    path = as_location(path)
    storage = storage_for(path)
    manifest_path = storage.join(path, MANIFEST)
    if not storage.is_file(manifest_path):
        raise CheckpointError(f"{path}: no {MANIFEST}; not a checkpoint, or an interrupted save")
    try:
        manifest = json.loads(storage.read_text(manifest_path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({err})") from None
    version = manifest.get("format") if isinstance(manifest, dict) else None
    try:
        if version == FORMAT_V1:
            manifest = _upgrade_v1(manifest)
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{manifest_path}: format {FORMAT_V1!r} without {err}") from None
    if version not in (FORMAT, FORMAT_V1):
        raise CheckpointError(
            f"{manifest_path}: format {version!r}, expected {FORMAT!r} (or the older {FORMAT_V1!r})"
        )
    if problem := manifest_problem(manifest) or _escaping_file(path, manifest["files"]):
        raise CheckpointError(f"{manifest_path}: {problem}")
    return manifest


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is missing or mistyped in a manifest of format 2's shape, or None.

    Checked once here, so that load and export never meet a KeyError or TypeError instead.
    """
    for key, kind in _ENTRIES.items():
        if key not in manifest:
            return f"no {key!r} entry"
        if not isinstance(manifest[key], kind) or (kind is int and isinstance(manifest[key], bool)):
            return f"{key!r} is {type(manifest[key]).__name__}, expected {kind.__name__}"
    if manifest["step"] < 0:
        return f"'step' is {manifest['step']}"
    for rel, info in manifest["files"].items():
        if not (
            isinstance(info, dict)
            and _is_int(info.get("bytes"))
            and info["bytes"] >= 0
            and _is_int(info.get("crc32"))
        ):
            return f"files entry {rel!r} is {info!r}, expected {{'bytes': int, 'crc32': int}}"
    if bad := sorted(
        name for name, state in manifest["states"].items() if not isinstance(state, dict)
    ):
        return f"states {bad} are not objects"
    if not all(isinstance(g, dict) for g in manifest["optimizer_param_groups"]):
        return "'optimizer_param_groups' holds a non-object"
    rng = manifest["rng"]
    states, of_rank = rng.get("states"), rng.get("of_rank")
    if not (isinstance(states, list) and states and all(isinstance(s, dict) for s in states)):
        return "'rng' has no list of states"
    if not (
        isinstance(of_rank, list)
        and of_rank
        and all(_is_int(i) and 0 <= i < len(states) for i in of_rank)
    ):
        return f"'rng' has no list of state indices below {len(states)} for each rank"
    return None


# the entries of format 2 and their JSON types (torch_version is informative: never read)
_ENTRIES: dict[str, type] = {
    "step": int,
    "tokens_seen": int,
    "model": dict,
    "layout": dict,
    "config": dict,
    "states": dict,
    "optimizer_param_groups": list,
    "extra": dict,
    "rng": dict,
    "files": dict,
}


def _escaping_file(path: Location, files: dict[str, Any]) -> str | None:
    """The first file name that is not `<part>/<name>` inside the checkpoint folder, or None.

    Checked before anything is read: a manifest is data, and may have been edited or crafted.
    """
    storage = storage_for(path)
    for rel in files:
        target = Path(rel)
        if (
            target.is_absolute()
            or "://" in rel
            or len(target.parts) != 2
            or target.parts[0] not in PARTS
            or ".." in target.parts
            or not storage.inside(path, rel)
        ):
            return (
                f"files entry {rel!r} is not a file of {'/ or '.join(PARTS)}/ inside {path}; "
                "refused before reading anything"
            )
    return None


def file_problems(
    path: Location,
    manifest: dict[str, Any],
    parts: tuple[str, ...] = PARTS,
    verify: Iterable[str] = (),
) -> list[str]:
    """Missing, resized or unlisted shard files of `parts`; CRC32 mismatches of those in `verify`.

    `manifest` is from read_manifest, so every listed name lies inside `path`.
    """
    storage = storage_for(path)
    problems = []
    listed = sorted(rel for rel in manifest["files"] if Path(rel).parts[0] in parts)
    for rel in listed:
        f = storage.join(path, *rel.split("/"))
        expected = manifest["files"][rel]["bytes"]
        if (size := storage.size(f)) is None:
            problems.append(f"missing shard file {f}")
        elif size != expected:
            problems.append(
                f"shard file {f} has {size} bytes, the manifest says {expected}: "
                "truncated or overwritten"
            )
    if not problems:
        for rel in verify:
            f = storage.join(path, *rel.split("/"))
            if file_crc32(f) != manifest["files"][rel]["crc32"]:
                problems.append(f"shard file {f} is corrupt: its CRC32 differs from the manifest")
    # the safetensors reader reads every *.safetensors file it finds, listed or not
    unlisted = sorted(
        f for f in set(shard_files(path, parts)) - set(listed) if f.endswith(".safetensors")
    )
    problems += [
        f"unexpected file {storage.join(path, *rel.split('/'))} (not in the manifest)"
        for rel in unlisted
    ]
    return problems
