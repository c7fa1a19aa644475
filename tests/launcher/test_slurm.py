"""The Slurm side of the launcher without a cluster: the mesh-fits-allocation check and its
command line, and requeue being a no-op outside Slurm."""

from __future__ import annotations

import subprocess
import sys

import pytest

from launcher.config import ConfigError
from launcher.slurm import check_fits_allocation, requeue_if_slurm
from tests.helpers.run_training import make_config

MESH_2X2 = ["model=debug", "parallel.pp=2", "parallel.tp=2", "parallel.microbatches=2"]


def test_mesh_fits_allocation() -> None:
    check_fits_allocation(make_config(MESH_2X2, 4), nodes=2, ranks_per_node=2)


def test_mesh_larger_than_allocation_names_both_fixes() -> None:
    with pytest.raises(
        ConfigError,
        match=r"= 4 ranks, but the allocation has 1 nodes x 2 ranks per node = 2; "
        r"change parallel.dp/pp/tp or submit with --nodes=2",
    ):
        check_fits_allocation(make_config(MESH_2X2, 4), nodes=1, ranks_per_node=2)


def test_tp_may_not_span_nodes() -> None:
    cfg = make_config(["model=debug", "parallel.tp=4"], 4)
    with pytest.raises(ConfigError, match="inside one node") as err:
        check_fits_allocation(cfg, nodes=2, ranks_per_node=2)
    assert err.value.field_name == "parallel.tp"


def test_check_command_exits_2_with_one_line() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.slurm",
            "--nodes",
            "2",
            "--ranks-per-node",
            "2",
            *MESH_2X2,
            "parallel.dp=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(
        "config error: parallel.dp=2: dp*pp*tp = 2*2*2 = 8 ranks"
    )


def test_requeue_is_a_no_op_outside_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_if_slurm() is False
