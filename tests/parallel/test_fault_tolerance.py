"""Fault-tolerant HSDP replica groups (torchft) on real gloo processes: parity with plain HSDP,
and a group SIGKILLed mid-run that comes back, heals from a live peer and finishes with the
others."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.replica_groups import ReplicaGroups, store_port
from tests.helpers.run_training import train_and_report
from tests.helpers.spawn import run_ranks

pytest.importorskip("torchft")  # the [ft] extra; in [dev], so CI always runs these

TINY = [
    "model=debug",
    "train.global_batch_size=12",
    "train.seq_len=32",
    "train.sample_tokens=0",
    "train.log_interval=1",
    "train.val_interval=1000",
    "train.val_batches=1",
    "checkpoint.final=false",
    "optim.warmup_steps=2",
]
FT = ["fault_tolerance.enable=true", "fault_tolerance.timeout_s=15"]


@pytest.fixture
def lighthouse() -> Iterator[str]:
    """An embedded torchft lighthouse; it drops a replica whose heartbeats stop for 3 s, and waits up to 10 s for live stragglers."""
    from parallel.fault_tolerance import start_lighthouse

    server = start_lighthouse("[::]:0", min_replicas=2)  # no quorum of one group
    yield server.address()
    server.shutdown()


def _weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.long(10)
@pytest.mark.parametrize(
    "layout,world",
    [
        # each replica group: FSDP2 over 2 ranks x a 2-stage pipeline (the hook under pp)
        (["parallel.dp=4", "parallel.pp=2", "parallel.microbatches=3"], 4),
        (["parallel.dp=4", "parallel.tp=2"], 4),  # FSDP2 x TP: the hook on 2-D DTensors
        (["parallel.dp=2", "parallel.pp=2", "parallel.microbatches=2"], 2),  # no FSDP2 inside
    ],
    ids=["dp_shard2_pp2", "dp_shard2_tp2", "pp2"],
)
def test_without_faults_losses_equal_plain_hsdp(
    layout: list[str], world: int, lighthouse: str, tmp_path: Path
) -> None:
    steps = ["train.steps=4", *layout, "parallel.dp_replicate=2"]
    groups = ReplicaGroups(
        [*TINY, *steps, *FT, "fault_tolerance.min_replicas=2"], world, lighthouse, tmp_path
    )
    try:
        for g in range(2):
            groups.start(g)
        per_group = [groups.results(g) for g in range(2)]
    finally:
        groups.stop_all()
    ref = run_ranks(2 * world, train_and_report, [*TINY, *steps], 2 * world)
    ref_losses = ref[0][0]
    # each group's loss is its own slices' mean; the global batch's is their average
    ft_losses = [sum(v) / 2 for v in zip(per_group[0][0][0], per_group[1][0][0])]
    assert len(ft_losses) == 4
    assert max(abs(a - b) / b for a, b in zip(ft_losses, ref_losses)) <= 1e-5
    for group in per_group:  # group rank i holds what rank i of the first HSDP replica holds
        for (_, w, _), (_, rw) in zip(group, ref[:world]):
            assert all(torch.allclose(w[k], rw[k], atol=1e-6) for k in w)
    for r in range(world):  # and the two groups bitwise equal, rank by rank
        assert _weights_equal(per_group[0][r][1], per_group[1][r][1])


def _logged_steps(records: list[dict[str, Any]]) -> list[int]:
    return [r["step"] for r in records]


@pytest.mark.long(12)
def test_killed_group_heals_from_a_peer_and_rejoins(lighthouse: str, tmp_path: Path) -> None:
    steps = 12
    run = [*TINY, f"train.steps={steps}", "parallel.dp=6", "parallel.dp_replicate=3"]
    groups = ReplicaGroups([*run, *FT, "fault_tolerance.min_replicas=2"], 2, lighthouse, tmp_path)
    try:
        for g in range(3):
            groups.start(g)
        groups.wait_for_step(2, 5)
        groups.kill(2)  # SIGKILL both ranks of group 2 after its step 5
        groups.start(2, attempt=1)  # as torchrun would restart it: fresh weights, step 0
        results = {g: groups.results(g) for g in range(3)}
    finally:
        groups.stop_all()
    # The survivors never restarted and ran to the end, each step at most once. One of them can
    # heal without restarting: a group slower to start than the others' first quorum heals in at
    # step 1, and when the kill breaks one group's collective but another group's completed,
    # only the latter commits that step and the former takes its state at the next quorum. The
    # run's loss curve (over the groups) has every step.
    survivors = [_logged_steps(groups.steps_logged(g)) for g in (0, 1)]
    for logged in survivors:
        assert logged == sorted(set(logged)) and logged[-1] == steps, logged
    assert set(survivors[0]) | set(survivors[1]) == set(range(1, steps + 1)), survivors
    killed = _logged_steps(groups.steps_logged(2, attempt=0))
    assert 5 in killed and killed == list(range(killed[0], killed[-1] + 1)) and killed[-1] < steps
    healed = _logged_steps(groups.steps_logged(2, attempt=1))
    # it joined mid-run at the live groups' step (healed, not from step 1) and ran to the end
    assert healed[0] > 5 and healed == list(range(healed[0], steps + 1)), healed
    finals = [results[g][0][1] for g in range(3)]
    assert _weights_equal(finals[0], finals[1]) and _weights_equal(finals[0], finals[2])
    for rank in range(2):  # each rank's shard of every group agrees, too
        assert _weights_equal(results[0][rank][1], results[2][rank][1])
    # the healed group loaded its peer's sampler before drawing its first batch: its data
    # position is every other group's, not one batch behind
    assert {results[g][r][2] for g in range(3) for r in range(2)} == {steps * 12}


def _lighthouse_process(port: int) -> subprocess.Popen:
    """torchft's lighthouse CLI as its own process, so it can disappear as a lost host would."""
    cli = Path(sys.executable).with_name("torchft_lighthouse")
    return subprocess.Popen(
        [str(cli), "--min_replicas", "2", "--bind", f"[::]:{port}", "--join_timeout_ms", "10000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_listening(port: int) -> str:
    from launcher.run.fault_tolerance import check_lighthouse

    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while check_lighthouse(address, 0.5) is not None:
        assert time.monotonic() < deadline, "the lighthouse did not start"
        time.sleep(0.1)
    return address


@pytest.mark.long(12)
def test_lighthouse_lost_stops_with_a_checkpoint_that_resumes(tmp_path: Path) -> None:
    # two groups of one rank: no sharding inside a group, gradients averaged after backward
    run = [
        *TINY,
        "train.steps=40",
        "parallel.dp=2",
        "parallel.dp_replicate=2",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        "fault_tolerance.enable=true",
        "fault_tolerance.timeout_s=4",
        "fault_tolerance.min_replicas=2",
    ]
    port = store_port()
    server = _lighthouse_process(port)
    groups = ReplicaGroups(run, 1, _wait_listening(port), tmp_path)
    try:
        for g in range(2):
            groups.start(g)
        groups.wait_for_step(0, 3)
        server.kill()  # the lighthouse disappears mid-run
        server.wait()
        for g in range(2):
            with pytest.raises(RuntimeError, match="LighthouseLost") as err:
                groups.results(g)
            line = [x for x in str(err.value).splitlines() if "LighthouseLost:" in x][-1]
            assert "no quorum from the lighthouse" in line and "checkpoint saved" in line, line
        stopped = [_logged_steps(groups.steps_logged(g))[-1] for g in range(2)]
        assert stopped[0] == stopped[1] < 40
        server = _lighthouse_process(port)  # back: both groups resume from their checkpoints
        resumed = ReplicaGroups([*run, "train.resume=auto"], 1, _wait_listening(port), tmp_path)
        for g in range(2):
            resumed.start(g, attempt=1)
        finals = [resumed.results(g)[0][1] for g in range(2)]
    finally:
        groups.stop_all()
        server.kill()
    for g in range(2):
        steps = _logged_steps(resumed.steps_logged(g, attempt=1))
        assert steps == list(range(stopped[0] + 1, 41)), steps
    assert _weights_equal(finals[0], finals[1])
