"""The storage seam: every "never lose a run" guarantee on the local file system and on fsspec
(`memory://`, an object-store-like file system with no rename, and `file://`).

One spawned rank runs the fault scenarios on each storage (memory:// lives in one process);
two ranks (dp=2) train, save and resume through a file:// URL, bitwise.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from launcher.config import ConfigError
from launcher.run.build import build_trainer, load_data
from launcher.run.checkpointing import RunCheckpoints, load_trainer
from launcher.run.compose import compose_config
from parallel.checkpoint.backends import storage_for
from parallel.checkpoint.format import complete_checkpoints, find_latest, read_manifest
from parallel.checkpoint.state import CheckpointError
from parallel.checkpoint.storage import is_url
from tests.helpers.run_training import make_config, train_and_report
from tests.helpers.spawn import run_ranks

BASE = [
    "model=debug",
    "train.seq_len=32",
    "train.global_batch_size=8",
    "train.sample_tokens=0",
    "train.val_interval=1000",
    "device=cpu",
]
KINDS = ("local", "file", "memory")
MODEL_SHARD = "model/shard-00001-model-00001-of-00001.safetensors"


def _root(kind: str, tmp: str) -> Any:
    if kind == "local":
        return Path(tmp) / "local"
    if kind == "file":
        return f"file://{tmp}/file"
    return f"memory://seam-{uuid.uuid4().hex}"


def _error(fn: Any) -> str:
    try:
        fn()
    except CheckpointError as err:
        return str(err)
    return "no error"


def _names(root: Any) -> list[str]:
    return sorted(storage_for(root).list(root))


def _rewrite(path: Any, edit: Any) -> None:
    """Replace a file's bytes by edit(bytes), through its storage."""
    storage = storage_for(path)
    with storage.open_read(path) as f:
        data = f.read()
    with storage.open_write(path) as f:
        f.write(edit(data))


def _scenarios(kind: str, tmp: str) -> dict[str, Any]:
    """On one rank, one storage: saves that fail in each way, a kill's leftover, corruption."""
    import parallel.checkpoint.commit as commit
    import parallel.checkpoint.save as save
    import parallel.checkpoint.stream as stream

    root = _root(kind, tmp)
    storage = storage_for(root)
    seen: dict[str, Any] = {"storage": type(storage).__name__}
    cfg = make_config(BASE + ["train.steps=8", "checkpoint.keep=1", f"checkpoint.dir={root}"])
    trainer = build_trainer(cfg, load_data(cfg))
    checkpoints = RunCheckpoints(cfg, None)
    checkpoints.preflight(trainer)  # probes the root (and its free space where it has one)
    if kind != "memory":  # a root under a regular file: refused before training, naming it
        Path(tmp, "a-file").write_text("x")
        parent = f"file://{tmp}/a-file" if kind == "file" else Path(tmp, "a-file")
        cfg.checkpoint.dir = str(storage.join(parent, "ck"))
        try:
            RunCheckpoints(cfg, None).preflight(trainer)
            seen["unwritable"] = "no error"
        except ConfigError as err:
            seen["unwritable"] = str(err)
        cfg.checkpoint.dir = str(root)
    trainer.train_step()
    checkpoints.save(trainer)
    seen["first"] = (_names(root), storage.read_text(storage.join(root, "latest")))

    # a shard write fails (disk full) in the optimizer part of step 2
    trainer.train_step()
    original_write = stream._CountingStream.write

    def full(self: Any, data: Any) -> int:
        if "/optim/" in str(self.record.path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original_write(self, data)

    stream._CountingStream.write = full
    seen["shard"] = _error(lambda: checkpoints.save(trainer))
    stream._CountingStream.write = original_write
    seen["shard_after"] = _names(root)

    # every shard written, the manifest write fails
    original_text = commit._write_text

    def no_manifest(path: Any, text: str) -> None:
        if str(path).endswith("manifest.json"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        original_text(path, text)

    commit._write_text = no_manifest
    seen["manifest"] = _error(lambda: checkpoints.save(trainer))
    seen["manifest_after"] = _names(root)

    # killed between the shards and the manifest: what a kill leaves stays (no cleanup ran)
    original_discard = save.discard
    save.discard = lambda tmp, final: None
    _error(lambda: checkpoints.save(trainer))
    commit._write_text, save.discard = original_text, original_discard
    seen["killed_after"] = _names(root)
    seen["found"] = str(find_latest(root)).rsplit("/", 1)[-1]
    seen["complete"] = [str(p).rsplit("/", 1)[-1] for p in complete_checkpoints(root)]

    # the next save clears the leftover; keep=1 rotates step 1 out only after step 3 is committed
    trainer.train_step()
    checkpoints.save(trainer)
    seen["next_after"] = _names(root)
    step3 = storage.join(root, "step-00000003")
    seen["latest"] = storage.read_text(storage.join(root, "latest")).strip()

    # the same step saved again: swapped locally; kept on fsspec, so even a save failing at
    # its first write loses nothing
    if is_url(root):
        commit._write_text = lambda *a: (_ for _ in ()).throw(OSError(28, "No space left"))
    checkpoints.save(trainer)
    commit._write_text = original_text
    seen["again_after"] = _names(root)
    fresh = build_trainer(cfg, load_data(cfg))
    seen["loaded_step"] = load_trainer(step3, fresh)["step"]
    seen["same_next_loss"] = fresh.train_step().loss.item() == trainer.train_step().loss.item()

    # a corrupt, a truncated and a crafted checkpoint are refused, naming the file
    shard = storage.join(step3, *MODEL_SHARD.split("/"))
    with storage.open_read(shard) as f:
        good = f.read()
    _rewrite(shard, lambda b: b[: len(b) // 2] + b"\xff" * 64 + b[len(b) // 2 + 64 :])
    seen["flipped"] = _error(lambda: load_trainer(step3, fresh))
    _rewrite(shard, lambda b: b[: len(b) // 2])
    seen["truncated"] = _error(lambda: load_trainer(step3, fresh))
    _rewrite(shard, lambda b: good)
    manifest = storage.join(step3, "manifest.json")
    text = storage.read_text(manifest)
    storage.write_text(manifest, text.replace(f'"{MODEL_SHARD}"', '"../../etc/hostname"', 1))
    seen["escaping"] = _error(lambda: read_manifest(step3))
    storage.write_text(manifest, text)
    seen["restored"] = _error(lambda: load_trainer(step3, fresh))

    # a background save (its own thread and gloo group) commits the same way
    cfg.checkpoint.async_save = True
    background = RunCheckpoints(cfg, None)
    background.save(trainer)  # step 4
    background.close()
    seen["async_after"] = _names(root)
    return seen


def _all_scenarios(tmp: str) -> list[dict[str, Any]]:
    return [_scenarios(kind, tmp) for kind in KINDS]


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    tmp = str(tmp_path_factory.mktemp("storage"))
    return dict(zip(KINDS, run_ranks(1, _all_scenarios, tmp)[0]))


def _tmp_left(kind: str, step: int) -> list[str]:
    """What a killed save of `step` leaves beside the checkpoints (its staging folder)."""
    return [f".tmp-step-{step:08d}"] if kind == "local" else [f"step-{step:08d}"]


@pytest.mark.parametrize("kind", KINDS)
def test_storage_of_each_location(kind: str, scenarios: dict[str, dict[str, Any]]) -> None:
    expected = "LocalStorage" if kind == "local" else "FsspecStorage"
    assert scenarios[kind]["storage"] == expected
    assert scenarios[kind]["first"] == (["latest", "step-00000001"], "step-00000001\n")
    if kind != "memory":
        message = scenarios[kind]["unwritable"]
        assert message.startswith("config error: checkpoint.dir=") and "a-file/ck" in message
        assert "rank 0: cannot write" in message, message


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_write_or_manifest_commits_nothing(
    kind: str, scenarios: dict[str, dict[str, Any]]
) -> None:
    seen = scenarios[kind]
    for case, problem in (("shard", "No space left on device"), ("manifest", "manifest.json")):
        assert seen[case].startswith("cannot save checkpoint step 2"), seen[case]
        assert problem in seen[case] and "nothing was committed" in seen[case], seen[case]
        # keep=1 deleted nothing, and nothing of the failed save is left
        assert seen[f"{case}_after"] == ["latest", "step-00000001"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_save_killed_before_its_manifest_is_never_read_and_is_cleared(
    kind: str, scenarios: dict[str, dict[str, Any]]
) -> None:
    seen = scenarios[kind]
    assert seen["killed_after"] == sorted(["latest", "step-00000001", *_tmp_left(kind, 2)])
    assert seen["found"] == "step-00000001" and seen["complete"] == ["step-00000001"]
    # rotation (keep=1) ran only after step 3 was committed; the leftover went with that save
    assert seen["next_after"] == ["latest", "step-00000003"]
    assert seen["latest"] == "step-00000003"


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_saved_again_loads_whole_and_a_background_save_commits(
    kind: str, scenarios: dict[str, dict[str, Any]]
) -> None:
    seen = scenarios[kind]
    assert seen["again_after"] == ["latest", "step-00000003"]
    assert seen["loaded_step"] == 3 and seen["same_next_loss"]  # bitwise
    assert seen["async_after"] == ["latest", "step-00000004"]  # keep=1 after the commit


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_truncated_or_crafted_files_are_refused(
    kind: str, scenarios: dict[str, dict[str, Any]]
) -> None:
    seen = scenarios[kind]
    assert MODEL_SHARD in seen["flipped"] and "corrupt" in seen["flipped"], seen["flipped"]
    assert MODEL_SHARD in seen["truncated"] and "truncated" in seen["truncated"]
    assert "'../../etc/hostname'" in seen["escaping"] and "refused before" in seen["escaping"]
    assert seen["restored"] == "no error"


def _train_save_resume(root: str) -> dict[str, Any]:
    """On 2 ranks (dp=2), through the real loop: 4 steps saving at 2 and 4 into `root`; then
    resumed from step 2 (its URL), steps 3-4, saving step 4 again over the first run's."""
    over = BASE + ["parallel.dp=2", "train.steps=4", "checkpoint.interval=2"]
    straight, _ = train_and_report(over + [f"checkpoint.dir={root}"], 2)
    step2 = f"{root}/step-00000002"
    resumed, _ = train_and_report(over + [f"checkpoint.dir={root}", f"train.resume={step2}"], 2)
    return {"straight": straight, "resumed": resumed, "found": str(find_latest(root))}


def test_two_ranks_resume_exactly_through_a_file_url(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/ck"
    r0, r1 = run_ranks(2, _train_save_resume, url)
    assert len(r0["straight"]) == 4 and r0["resumed"] == r0["straight"][2:]  # bitwise
    assert r1["resumed"] == r1["straight"][2:] and r0["found"] == f"{url}/step-00000004"
    # the layout on disk is the local one (no .tmp- folder: fsspec commits by manifest)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "latest",
        "step-00000002",
        "step-00000004",
    ]
    assert read_manifest(tmp_path / "ck" / "step-00000004")["step"] == 4


def _missing_protocol() -> str:
    """A protocol fsspec knows whose package is not installed here."""
    from fsspec.registry import known_implementations

    for protocol in ("s3", "gcs", "abfs", "oci", "webdav"):
        module = known_implementations[protocol]["class"].split(".")[0]
        if importlib.util.find_spec(module) is None:
            return protocol
    raise AssertionError("every candidate protocol's package is installed")


@pytest.mark.parametrize("field", ["checkpoint.dir", "train.resume"])
def test_a_url_fsspec_cannot_open_is_a_config_error(field: str) -> None:
    protocol = _missing_protocol()
    for url, words in (
        (f"{protocol}://bucket/ck", [f"protocol {protocol!r} needs a package"]),
        ("nosuch://bucket/ck", ["fsspec knows no protocol 'nosuch'"]),
    ):
        with pytest.raises(ConfigError) as err:
            compose_config(BASE + [f"{field}={url}"], world_size=1)
        message = str(err.value)
        assert message.startswith(f"config error: {field}='{url}': ") and "\n" not in message
        assert all(w in message for w in words), message
