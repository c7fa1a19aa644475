"""Checkpoints: exact resume, resharding across layouts, atomic commits under kill -9, bad input.

Multi-layout scenarios run inside spawned gloo ranks (tests/helpers/spawn.py). The checkpoints live in
one module-wide directory, so a later spawn loads what an earlier one saved in another layout:
  single (1 rank)  saves a/ at (1,1,1)          eight (8 ranks) saves b/ at (2,2,2,v2), loads a/
  four (4 ranks)   saves c/ at (1,4,1,v2), loads it at (1,4,1,v2), (2,1,2), cp=2 x tp=2 and HSDP
                   2x2; saves d/ at HSDP dp=2 (2 replicas) x cp=2, loads it at dp=4
  reloads (1 rank) loads b/, resumes what a killed save left, tries corrupted copies of a/
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from launcher.run.build import build_trainer, load_data, model_args
from launcher.run.checkpointing import load_trainer, save_trainer
from launcher.run.trainer import Trainer
from parallel.checkpoint.format import (
    FORMAT,
    checkpoint_name,
    find_latest,
    model_args_of,
    read_manifest,
    resume_path,
)
from parallel.checkpoint.state import CheckpointError
from tests.helpers.run_training import make_config
from tests.helpers.spawn import run_ranks

REPO = Path(__file__).resolve().parents[3]
# as tests/parallel/test_parity.py: fp32, and an eps that keeps rounding noise from flipping
# Adam's first steps, so different layouts agree to 1e-5
BASE = [
    "model=debug",
    "train.steps=6",
    "train.seq_len=16",
    "train.global_batch_size=32",
    "train.sample_tokens=0",
    "train.val_interval=1000",
    "optim.warmup_steps=1",
    "optim.eps=1e-5",
    "device=cpu",
    "parallel.microbatches=8",
]
Layout = tuple[int, int, int, int, str]  # dp, pp, tp, virtual_stages, schedule
SINGLE: Layout = (1, 1, 1, 1, "1f1b")
DP2_PP2_TP2_V2: Layout = (2, 2, 2, 2, "interleaved_1f1b")
PP4_V2: Layout = (1, 4, 1, 2, "interleaved_1f1b")
DP2_TP2: Layout = (2, 1, 2, 1, "1f1b")
DP2: Layout = (2, 1, 1, 1, "1f1b")
DP4: Layout = (4, 1, 1, 1, "1f1b")
TP2: Layout = (1, 1, 2, 1, "1f1b")
CP2 = ("parallel.cp=2",)
HSDP = ("parallel.dp_replicate=2",)


# ---- run inside the ranks -----------------------------------------------------------------


def _trainer(layout: Layout, overrides: tuple[str, ...] = ()) -> Trainer:
    dp, pp, tp, v, schedule = layout
    cfg = make_config(
        BASE
        + [
            f"parallel.dp={dp}",
            f"parallel.pp={pp}",
            f"parallel.tp={tp}",
            f"parallel.virtual_stages={v}",
            f"parallel.schedule={schedule}",
            *overrides,
        ],
        int(os.environ.get("WORLD_SIZE", "1")),  # the spawned ranks: dp*pp*tp, times cp if set
    )
    return build_trainer(cfg, load_data(cfg))


def _steps(trainer: Trainer, n: int) -> list[float]:
    return [trainer.global_mean(trainer.train_step().loss).item() for _ in range(n)]


def _save(root: Path, trainer: Trainer, keep: int | None = None) -> Path:
    """save_checkpoint with the trainer's parts, through the launcher's glue."""
    return save_trainer(root, trainer, {"note": "test"}, keep)


def _load(path: Path, trainer: Trainer, verify: bool = True) -> dict[str, Any]:
    """load_checkpoint into the trainer's parts; the trainer then stands at the saved step."""
    return load_trainer(path, trainer, verify)


def _save_and_continue(
    layout: Layout, root: str, save_at: int, total: int, overrides: tuple[str, ...] = ()
) -> list[float]:
    """Losses of an uninterrupted run that saves a checkpoint after `save_at` steps."""
    trainer = _trainer(layout, overrides)
    losses = _steps(trainer, save_at)
    _save(Path(root), trainer)
    return losses + _steps(trainer, total - save_at)


def _load_and_continue(
    layout: Layout,
    path: str,
    n: int,
    fresh_optimizer: bool = False,
    overrides: tuple[str, ...] = (),
) -> list[float]:
    """Losses of n steps after loading `path` into a new trainer."""
    trainer = _trainer(layout, overrides)
    manifest = _load(Path(path), trainer)
    assert trainer.step == manifest["step"] and manifest["extra"] == {"note": "test"}
    if fresh_optimizer:  # what a run that restored only the weights would do
        trainer.optimizer.state.clear()
    return _steps(trainer, n)


def _resume_and_save(layout: Layout, root: str) -> list[float]:
    """Resume from the newest checkpoint under root, take one step, save (keep=2)."""
    trainer = _trainer(layout)
    _load(find_latest(Path(root)), trainer)
    losses = _steps(trainer, 1)
    _save(Path(root), trainer, keep=2)
    return losses


def _load_error(
    layout: Layout, path: str, overrides: tuple[str, ...] = (), verify: bool = True
) -> str:
    try:
        _load(Path(path), _trainer(layout, overrides), verify=verify)
    except CheckpointError as err:
        return str(err)
    return "loaded without error"


def _each(calls: list[tuple[Callable[..., Any], tuple]]) -> list[Any]:
    return [fn(*args) for fn, args in calls]


def _save_until_killed(root: str, signal_file: str) -> None:
    """Child process: three saves (keep=2), one more step, then a save that stalls mid-way."""
    import parallel.checkpoint.save as save

    trainer = _trainer(SINGLE)
    for _ in range(3):
        print(json.dumps(_steps(trainer, 1)), flush=True)
        _save(Path(root), trainer, keep=2)
    print(json.dumps(_steps(trainer, 1)), flush=True)
    write_part = save.write_part

    def stalling(directory: Path, *args: Any) -> Any:
        written = write_part(directory, *args)
        Path(signal_file).write_text(str(directory))  # the model shard is on disk
        time.sleep(300)  # wait here for SIGKILL, before the optimizer part and the manifest
        return written

    save.write_part = stalling
    _save(Path(root), trainer, keep=2)


# ---- fixtures: each one spawn ------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


def _step_dir(root: Path, sub: str, step: int) -> str:
    return str(root / sub / checkpoint_name(step))


@pytest.fixture(scope="module")
def single(root: Path) -> list[list[float]]:
    """(1,1,1): 6 steps saving a/ at 3; then 3 steps resumed from a/."""
    return run_ranks(
        1,
        _each,
        [
            (_save_and_continue, (SINGLE, str(root / "a"), 3, 6)),
            (_load_and_continue, (SINGLE, _step_dir(root, "a", 3), 3)),
        ],
    )[0]


@pytest.fixture(scope="module")
def eight(root: Path, single: list[list[float]]) -> list[list[float]]:
    """(2,2,2,v2): 4 steps saving b/ at 2; then 3 steps resumed from a/ (saved at (1,1,1))."""
    a3 = _step_dir(root, "a", 3)
    return run_ranks(
        8,
        _each,
        [
            (_save_and_continue, (DP2_PP2_TP2_V2, str(root / "b"), 2, 4)),
            (_load_and_continue, (DP2_PP2_TP2_V2, a3, 3)),
        ],
    )[0]


@pytest.fixture(scope="module")
def four(root: Path) -> list[list[float]]:
    """(1,4,1,v2): 4 steps saving c/ at 2; 2 steps resumed from c/ there, at (2,1,2), at
    cp=2 x tp=2 and at HSDP 2x2. HSDP dp=2 x cp=2: 4 steps saving d/ at 2; 2 resumed at dp=4."""
    c2, d2 = _step_dir(root, "c", 2), _step_dir(root, "d", 2)
    return run_ranks(
        4,
        _each,
        [
            (_save_and_continue, (PP4_V2, str(root / "c"), 2, 4)),
            (_load_and_continue, (PP4_V2, c2, 2)),
            (_load_and_continue, (DP2_TP2, c2, 2)),
            (_load_and_continue, (TP2, c2, 2, False, CP2)),
            (_load_and_continue, (DP4, c2, 2, False, HSDP)),
            (_save_and_continue, (DP2, str(root / "d"), 2, 4, CP2 + HSDP)),
            (_load_and_continue, (DP4, d2, 2)),
        ],
    )[0]


@pytest.fixture(scope="module")
def killed(root: Path) -> dict[str, Any]:
    """A child saves at steps 1-3 (keep=2), steps once more and is SIGKILLed inside the next save;
    returns what it printed and what the directory looked like right after."""
    kill_root, signal_file = root / "killed", root / "save-started"
    code = (
        "import sys; from tests.parallel.checkpoint.test_checkpoint import _save_until_killed as f; "
        "f(*sys.argv[1:])"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(kill_root), str(signal_file)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not signal_file.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)  # kill -9, mid-save
    out, err = child.communicate()
    assert signal_file.exists(), f"the child never reached the stalled save:\n{err[-3000:]}"
    tmp = kill_root / ".tmp-step-00000004"
    return {
        "root": kill_root,
        "returncode": child.returncode,
        "losses": [json.loads(line)[0] for line in out.splitlines()],
        "entries": sorted(p.name for p in kill_root.iterdir()),
        "tmp_files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")),
        "latest": (kill_root / "latest").read_text().strip(),
        "found": find_latest(kill_root),
    }


@pytest.fixture(scope="module")
def reloads(
    root: Path, single: list[list[float]], eight: list[list[float]], killed: dict[str, Any]
) -> list[Any]:
    """One rank: b/ at (1,1,1) with and without its optimizer state, a resume (and new save)
    after the killed save, and every corrupted copy of a/ (see CORRUPTIONS)."""
    a3 = Path(_step_dir(root, "a", 3))
    calls: list[tuple[Callable[..., Any], tuple]] = [
        (_load_and_continue, (SINGLE, _step_dir(root, "b", 2), 2)),
        (_load_and_continue, (SINGLE, _step_dir(root, "b", 2), 2, True)),
        (_resume_and_save, (SINGLE, str(killed["root"]))),
    ]
    for name, (corrupt, overrides, verify, _) in CORRUPTIONS.items():
        copy = root / "bad" / name
        shutil.copytree(a3, copy)
        corrupt(copy)
        calls.append((_load_error, (SINGLE, str(copy), overrides, verify)))
    return run_ranks(1, _each, calls)[0]


# ---- bad input: how to break a copy of a/, load overrides, verify CRCs, expected message ----

MODEL_SHARD = "model/shard-00001-model-00001-of-00001.safetensors"
OPTIM_SHARD = "optim/shard-00001-model-00001-of-00001.safetensors"


def _truncate(d: Path) -> None:
    os.truncate(d / MODEL_SHARD, (d / MODEL_SHARD).stat().st_size // 2)


def _flip_bytes(d: Path) -> None:
    with open(d / MODEL_SHARD, "r+b") as f:
        f.seek((d / MODEL_SHARD).stat().st_size // 2)
        f.write(b"\xff" * 64)


def _garble_header(d: Path) -> None:
    with open(d / OPTIM_SHARD, "r+b") as f:
        f.seek(8)
        f.write(b"not json" * 8)


def _edit_manifest(d: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    edit(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest))


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], tuple[str, ...], bool, list[str]]] = {
    "truncated": (_truncate, (), True, [MODEL_SHARD, "truncated"]),
    "missing": (
        lambda d: (d / OPTIM_SHARD).unlink(),
        (),
        True,
        ["missing shard file", OPTIM_SHARD],
    ),
    "flipped": (_flip_bytes, (), True, [MODEL_SHARD, "corrupt"]),
    "bad_header": (_garble_header, (), False, ["optim", "safetensors headers"]),
    "no_manifest": (lambda d: (d / "manifest.json").unlink(), (), True, ["no manifest.json"]),
    "fewer_layers": (
        lambda d: None,
        ("model.n_layers=4",),
        True,
        ["another model", "layers.4.attention"],
    ),
    "wider_model": (
        lambda d: None,
        ("model.dim=128",),
        True,
        [
            "'layers.0.attention.wq.weight' has shape [64, 64] in the checkpoint but "
            "[128, 128] in this model"
        ],
    ),
    "other_data": (lambda d: None, ("train.seq_len=32",), True, ["manifest.json", "windows"]),
    "no_sampler_state": (
        lambda d: _edit_manifest(d, lambda m: m["states"].pop("sampler")),
        (),
        True,
        ["manifest.json", "no state ['sampler']"],
    ),
    "unknown_format": (
        lambda d: _edit_manifest(d, lambda m: m.update(format="tridist-9")),
        (),
        True,
        ["'tridist-9'", FORMAT],
    ),
    # a malformed manifest: a CheckpointError naming it and what is wrong, never a KeyError
    "no_files": (
        lambda d: _edit_manifest(d, lambda m: m.pop("files")),
        (),
        True,
        ["manifest.json", "no 'files' entry"],
    ),
    "no_states": (
        lambda d: _edit_manifest(d, lambda m: m.pop("states")),
        (),
        True,
        ["manifest.json", "no 'states' entry"],
    ),
    "no_rng": (
        lambda d: _edit_manifest(d, lambda m: m.pop("rng")),
        (),
        True,
        ["manifest.json", "no 'rng' entry"],
    ),
    "step_not_int": (
        lambda d: _edit_manifest(d, lambda m: m.update(step="3")),
        (),
        True,
        ["manifest.json", "'step' is str, expected int"],
    ),
    "files_entry_without_bytes": (
        lambda d: _edit_manifest(d, lambda m: m["files"][MODEL_SHARD].pop("bytes")),
        (),
        True,
        ["manifest.json", f"files entry '{MODEL_SHARD}'", "'bytes': int"],
    ),
    "rng_index_out_of_range": (
        lambda d: _edit_manifest(d, lambda m: m["rng"].update(of_rank=[7])),
        (),
        True,
        ["manifest.json", "'rng'"],
    ),
    # refused before anything is read (read_manifest reads the manifest alone)
    "file_outside_checkpoint": (
        lambda d: _edit_manifest(
            d, lambda m: m["files"].update({"../../etc/hostname": {"bytes": 1, "crc32": 0}})
        ),
        (),
        True,
        ["manifest.json", "'../../etc/hostname'", "refused before reading"],
    ),
}


# ---- tests -------------------------------------------------------------------------------


def _rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_exact_resume_single_process(single: list[list[float]]) -> None:
    straight, resumed = single
    assert resumed == straight[3:]  # bitwise


@pytest.mark.long(120)  # the `four` fixture: 7 trainings on 4 ranks
def test_exact_resume_on_pipeline_ranks(four: list[list[float]]) -> None:
    straight, resumed = four[:2]
    assert resumed == straight[2:]  # bitwise, (1,4,1) interleaved on 4 ranks


@pytest.mark.long(100)  # the `eight` fixture: 2 trainings on 8 ranks
def test_resharding_single_to_dp2_pp2_tp2(
    single: list[list[float]], eight: list[list[float]]
) -> None:
    assert _rel(eight[1], single[0][3:]) <= 1e-5


def test_resharding_dp2_pp2_tp2_to_single(eight: list[list[float]], reloads: list[Any]) -> None:
    assert _rel(reloads[0], eight[0][2:]) <= 1e-5


def test_resharding_pp4_interleaved_to_dp2_tp2(four: list[list[float]]) -> None:
    straight, _, resharded = four[:3]
    assert _rel(resharded, straight[2:]) <= 1e-5


def test_resharding_into_and_out_of_cp_and_hsdp(four: list[list[float]]) -> None:
    straight, into_cp, into_hsdp, cp_hsdp, out_of_both = four[0], *four[3:]
    assert _rel(into_cp, straight[2:]) <= 1e-5  # cp 1 -> 2 (with tp=2)
    assert _rel(into_hsdp, straight[2:]) <= 1e-5  # dp_replicate 1 -> 2
    assert _rel(cp_hsdp, straight) <= 1e-5  # HSDP over cp trains as one process does
    assert _rel(out_of_both, cp_hsdp[2:]) <= 1e-5  # cp 2 -> 1 and dp_replicate 2 -> 1


def test_optimizer_state_is_restored(eight: list[list[float]], reloads: list[Any]) -> None:
    # a fresh AdamW takes ~lr-sized sign steps: far off the 1e-5 the restored one meets
    assert _rel(reloads[1], eight[0][2:]) > 1e-3


def test_kill_during_save_keeps_previous_checkpoint(
    killed: dict[str, Any], reloads: list[Any]
) -> None:
    kill_root = killed["root"]
    assert killed["returncode"] == -signal.SIGKILL
    # the killed save left only its model shard (and the empty optim/ made up front) in .tmp;
    # steps 2 and 3 survive (keep=2)
    assert killed["entries"] == [".tmp-step-00000004", "latest", "step-00000002", "step-00000003"]
    assert killed["tmp_files"] == ["model", MODEL_SHARD, "optim"]
    assert killed["latest"] == "step-00000003" and killed["found"] == kill_root / "step-00000003"
    # resuming from it repeats the killed run's step 4 bitwise; the next save clears the leftover
    assert reloads[2] == killed["losses"][3:4]
    entries = sorted(p.name for p in kill_root.iterdir())
    assert entries == ["latest", "step-00000003", "step-00000004"]
    assert (kill_root / "latest").read_text().strip() == "step-00000004"


def test_manifest_records_the_architecture_and_states_by_name(
    root: Path, single: list[list[float]]
) -> None:
    raw = json.loads((root / "a" / checkpoint_name(3) / "manifest.json").read_text())
    assert raw["format"] == FORMAT == "tridist-checkpoint-2"
    args = model_args(make_config(BASE))
    assert raw["model"] == {f: getattr(args, f) for f in args.__dataclass_fields__}
    assert model_args_of(read_manifest(root / "a" / checkpoint_name(3))) == args
    assert sorted(raw["states"]) == ["lr_scheduler", "sampler"] and "sampler" not in raw
    assert raw["states"]["sampler"]["samples_consumed"] == 3 * 32 and raw["step"] == 3


def test_find_latest_ignores_a_stale_or_missing_pointer(tmp_path: Path) -> None:
    for step in (5, 7):
        (tmp_path / checkpoint_name(step)).mkdir()
        (tmp_path / checkpoint_name(step) / "manifest.json").write_text("{}")
    (tmp_path / checkpoint_name(9)).mkdir()  # no manifest: incomplete
    (tmp_path / ".tmp-step-00000011").mkdir()
    (tmp_path / "latest").write_text("step-00000005\n")  # stale
    assert find_latest(tmp_path) == tmp_path / "step-00000007"
    (tmp_path / "latest").unlink()
    assert find_latest(tmp_path) == tmp_path / "step-00000007"
    assert find_latest(tmp_path / "nothing-here") is None


def test_resume_path_resolves_auto_none_and_paths(tmp_path: Path) -> None:
    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000004" / "manifest.json").write_text("{}")
    assert resume_path("none", tmp_path) is None
    assert resume_path("auto", None) is None and resume_path("auto", tmp_path / "new") is None
    assert resume_path("auto", tmp_path) == tmp_path / "step-00000004"
    assert resume_path(str(tmp_path), None) == tmp_path / "step-00000004"  # a checkpoint root
    assert resume_path(str(tmp_path / "step-00000004"), None) == tmp_path / "step-00000004"
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resume_path(str(tmp_path / "new"), None)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_bad_checkpoint_raises_clear_error(name: str, reloads: list[Any]) -> None:
    message = reloads[3 + list(CORRUPTIONS).index(name)]
    for expected in CORRUPTIONS[name][3]:
        assert expected in message, message
