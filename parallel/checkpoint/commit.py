"""Committing a checkpoint (rank 0): the manifest written last, the commit, `latest`, rotation.

Written by hand, because DCP's safetensors storage does not do it. The order is the guarantee:
shards, then the manifest, then the storage's commit (locally the rename of
root/.tmp-step-XXXXXXXX to step-XXXXXXXX; on fsspec the manifest itself: storage.py), so a
folder named step-* with a manifest.json is complete; then `latest`, and only then are
checkpoints beyond `keep` deleted, so a failed save never costs an older checkpoint.
"""

from __future__ import annotations

import json
from typing import Any

from parallel.checkpoint.backends import storage_for
from parallel.checkpoint.format import (
    LATEST,
    MANIFEST,
    PARTS,
    TMP_PREFIX,
    complete_checkpoints,
    step_of,
)
from parallel.checkpoint.storage import Location

__all__ = ["UNTOUCHED", "clear_tmp", "discard", "write_and_commit"]

UNTOUCHED = "; nothing was committed (earlier checkpoints are untouched)"


def _write_text(path: Location, text: str) -> None:
    """Readers see the old or the new file (the storage's write_text)."""
    storage_for(path).write_text(path, text)


def _uncommit(path: Location) -> None:
    """Delete a checkpoint folder, its manifest first: half-deleted, it reads as incomplete."""
    storage = storage_for(path)
    storage.remove(storage.join(path, MANIFEST))
    storage.remove(path)


def clear_tmp(root: Location, tmp: Location) -> str | None:
    """Create root, remove what killed saves left (.tmp-*; on a storage that writes in place,
    manifest-less step-* folders and a committed one at `tmp`, saved again) and make the part
    folders in `tmp`; why that failed, or None."""
    storage = storage_for(root)
    try:
        storage.makedirs(root)
        for name in storage.list(root):
            path = storage.join(root, name)
            in_place = step_of(name) is not None and str(storage.staging(root, name)) == str(path)
            if name.startswith(TMP_PREFIX):
                storage.remove(path)
            elif in_place and (
                str(path) == str(tmp) or not storage.is_file(storage.join(path, MANIFEST))
            ):
                _uncommit(path)
        for part in PARTS:  # made here, once, so no rank's writer fails to create it alone
            storage.makedirs(storage.join(tmp, part))
    except OSError as err:
        return f"{err.filename or root}: {err.strerror or err}" + UNTOUCHED
    return None


def discard(tmp: Location, final: Location) -> None:
    """Remove what a save left in `tmp` unless it was committed (best effort: the next save's
    clear_tmp removes whatever this could not)."""
    storage = storage_for(tmp)
    try:
        if str(tmp) != str(final):
            storage.remove(tmp)
        elif not storage.is_file(storage.join(final, MANIFEST)):
            storage.remove(final)
    except OSError:
        pass


def _dedup_rng(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Each distinct RNG state once plus, per rank, which one: ranks seeded alike share a state,
    so the manifest stays small at thousands of ranks."""
    states: list[dict[str, Any]] = []
    keys: list[str] = []
    of_rank = []
    for state in per_rank:
        key = json.dumps(state, sort_keys=True)
        if key not in keys:
            keys.append(key)
            states.append(state)
        of_rank.append(keys.index(key))
    return {"states": states, "of_rank": of_rank}


def write_and_commit(
    manifest: dict[str, Any],
    gathered: list[dict[str, Any]],
    root: Location,
    tmp: Location,
    final: Location,
    keep: int | None,
    failed: str,
) -> str | None:
    """Rank 0: complete the manifest with every rank's RNG state and files, write it into tmp,
    commit tmp as final, move `latest`, rotate; why that failed (a message), or None."""
    storage = storage_for(root)
    manifest = dict(manifest)
    manifest["rng"] = _dedup_rng([g["rng"] for g in gathered])
    infos = {f: info for g in gathered for f, info in g["files"].items()}
    manifest["files"] = {f: infos[f] for f in sorted(infos)}
    try:
        _write_text(storage.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
        storage.commit(tmp, final)
    except OSError as err:
        return f"{failed}: {err.filename or tmp}: {err.strerror or err}" + UNTOUCHED
    name = str(final).rstrip("/").rsplit("/", 1)[-1]
    try:  # the checkpoint is complete from here on: a failure below loses nothing
        _write_text(storage.join(root, LATEST), name + "\n")
        _rotate(root, final, keep)
    except OSError as err:
        return (
            f"checkpoint {final} is committed, but then {err.filename}: {err.strerror or err} "
            "(older checkpoints were not rotated out)"
        )
    return None


def _rotate(root: Location, final: Location, keep: int | None) -> None:
    """Drop complete checkpoints beyond the newest `keep` (never `final`): only after a commit."""
    if keep is not None and keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            if str(old) != str(final):
                _uncommit(old)
