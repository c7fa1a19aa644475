"""Committing a checkpoint (rank 0): the manifest written last, the rename, `latest`, rotation.

Written by hand, because DCP's safetensors storage does not do it. The order is the guarantee:
shards, then the manifest, then the rename of root/.tmp-step-XXXXXXXX to step-XXXXXXXX (a
directory named step-* with a manifest.json is complete), then `latest`, and only then are
checkpoints beyond `keep` deleted, so a failed save never costs an older checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from parallel.checkpoint.format import LATEST, MANIFEST, PARTS, TMP_PREFIX, complete_checkpoints

__all__ = ["UNTOUCHED", "clear_tmp", "write_and_commit"]

UNTOUCHED = "; nothing was committed (earlier checkpoints are untouched)"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary name and os.replace, so readers see the old or the new file."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def clear_tmp(root: Path, tmp: Path) -> str | None:
    """Create root and remove what killed saves left (.tmp-*); why that failed, or None."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        for part in PARTS:  # made here, once, so no rank's writer fails to create it alone
            (tmp / part).mkdir(parents=True)
    except OSError as err:
        return f"{err.filename}: {err.strerror}" + UNTOUCHED
    return None


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
    tmp: Path,
    final: Path,
    keep: int | None,
    failed: str,
) -> str | None:
    """Rank 0: complete the manifest with every rank's RNG state and files, write it into tmp,
    rename tmp to final, move `latest`, rotate; why that failed (a message), or None."""
    root = final.parent
    manifest = dict(manifest)
    manifest["rng"] = _dedup_rng([g["rng"] for g in gathered])
    infos = {f: info for g in gathered for f, info in g["files"].items()}
    manifest["files"] = {f: infos[f] for f in sorted(infos)}
    try:
        _write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        _commit(root, tmp, final)
    except OSError as err:
        return f"{failed}: {err.filename or tmp}: {err.strerror}" + UNTOUCHED
    try:  # the checkpoint is complete from here on: a failure below loses nothing
        _write_text(root / LATEST, final.name + "\n")
        _rotate(root, final, keep)
    except OSError as err:
        return (
            f"checkpoint {final} is committed, but then {err.filename}: {err.strerror} "
            "(older checkpoints were not rotated out)"
        )
    return None


def _commit(root: Path, tmp: Path, final: Path) -> None:
    """Rename tmp into place (a checkpoint of the same step is swapped out)."""
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. after resuming): swap it out
        trash = root / f"{TMP_PREFIX}old-{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        try:
            tmp.rename(final)
        except OSError:
            trash.rename(final)  # put the old one back: a failed save loses nothing
            raise
        shutil.rmtree(trash, ignore_errors=True)  # committed: a leftover goes with the next save
    else:
        tmp.rename(final)
    _fsync_dir(root)


def _rotate(root: Path, final: Path, keep: int | None) -> None:
    """Drop complete checkpoints beyond the newest `keep` (never `final`): only after a commit."""
    if keep is not None and keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            if old != final:
                shutil.rmtree(old)
