"""Invalid mesh and schedule settings are refused by validate(), naming field and fix."""

import subprocess
import sys

import pytest

from launcher.config import ConfigError
from launcher.run.compose import compose_config
from tests.helpers.run_training import make_config

CASES = [  # overrides, world size, field named in the error
    (
        [
            "parallel.pp=2",
            "parallel.microbatches=2",
            "parallel.schedule=1f1b",
            "parallel.virtual_stages=2",
        ],
        2,
        "parallel.virtual_stages",
    ),
    (
        ["parallel.pp=2", "parallel.schedule=zbv", "parallel.microbatches=4"],
        2,
        "parallel.virtual_stages",
    ),
    (
        ["parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=1"],
        2,
        "parallel.microbatches",
    ),
    (
        [
            "model=debug",
            "parallel.pp=4",
            "parallel.virtual_stages=2",
            "parallel.schedule=interleaved_1f1b",
            "parallel.microbatches=9",
            "train.global_batch_size=18",
        ],
        4,
        "parallel.microbatches",
    ),
    (
        [
            "model.n_layers=5",
            "parallel.pp=3",
            "parallel.microbatches=4",
            "parallel.layers_per_stage=even",
        ],
        3,
        "parallel.layers_per_stage",
    ),
    (
        ["parallel.pp=2", "parallel.microbatches=2", "parallel.layers_per_stage=best"],
        2,
        "parallel.layers_per_stage",
    ),
    (
        [
            "model.n_layers=1",
            "parallel.pp=4",
            "parallel.microbatches=4",
            "parallel.layers_per_stage=auto",
        ],
        4,
        "parallel.layers_per_stage",
    ),
    (["parallel.tp=3"], 3, "model.n_heads"),
    (["parallel.tp=8"], 8, "model.n_kv_heads"),
    (["parallel.pp=2", "parallel.schedule=warp_speed"], 2, "parallel.schedule"),
    (["parallel.dp=3"], 3, "train.global_batch_size"),
    (
        [
            "parallel.tp=2",
            "parallel.sequence_parallel=true",
            "train.seq_len=127",
            "train.sample_tokens=0",
        ],
        2,
        "train.seq_len",
    ),
    (["parallel.cp=2", "train.seq_len=126"], 2, "train.seq_len"),  # 2*cp chunks
    (  # under SP each rank's seq_len/cp tokens split by tp: lcm(2*cp, cp*tp) = 8
        ["parallel.cp=2", "parallel.tp=4", "parallel.sequence_parallel=true", "train.seq_len=124"],
        8,
        "train.seq_len",
    ),
    (["parallel.cp=2", "parallel.cp_comm=a2a"], 2, "parallel.cp_comm"),
    (["parallel.cp=2", "parallel.tp=2"], 2, "parallel.dp"),  # dp*pp*cp*tp = 4 ranks, not 2
    (["parallel.dp=4", "parallel.dp_replicate=3"], 4, "parallel.dp_replicate"),
    (
        ["parallel.dp=4", "parallel.dp_replicate=2", "parallel.dp_shard=false"],
        4,
        "parallel.dp_replicate",
    ),
]


@pytest.mark.parametrize("overrides,world,field", CASES)
def test_refused(overrides: list[str], world: int, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_config(overrides, world)
    assert err.value.field_name == field, str(err.value)


def test_sequence_parallel_accepted_when_the_sequence_splits() -> None:
    cfg = make_config(["parallel.tp=2", "parallel.sequence_parallel=true"], 2)
    assert cfg.parallel.sequence_parallel and cfg.train.seq_len % 2 == 0
    with pytest.raises(ConfigError, match=r"train.seq_len=126 or parallel.sequence_parallel=false"):
        make_config(["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=127"], 2)
    make_config(
        ["parallel.sequence_parallel=true", "train.seq_len=127"], 1
    )  # tp=1: nothing to split


def test_cp_and_hsdp_layouts_and_their_messages() -> None:
    with pytest.raises(ConfigError, match=r"dp\*pp\*cp\*tp = 1\*1\*2\*2 = 4 must equal the world"):
        make_config(["parallel.cp=2", "parallel.tp=2"], 2)
    with pytest.raises(ConfigError, match=r"train.seq_len=124 or lower parallel.cp"):
        make_config(["parallel.cp=2", "train.seq_len=126"], 2)
    cfg = make_config(["parallel.dp=4", "parallel.dp_replicate=2", "parallel.cp=2"], 8)
    assert cfg.parallel.world_size == 8
    make_config(["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"], 4)


def test_tp_may_not_cross_a_node() -> None:
    with pytest.raises(ConfigError, match="inside one node"):
        compose_config(["parallel.tp=4"], 4, ranks_per_node=2)
    compose_config(["parallel.tp=4", "parallel.allow_cross_node_tp=true"], 4, ranks_per_node=2)


def test_refused_before_any_process_group_under_torchrun() -> None:
    # 2 ranks, pp=2 with 1 microbatch: refused by every rank before init_process_group, so
    # torchrun returns promptly with exit code 2 from the workers instead of hanging in rendezvous
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "launcher.train",
            "parallel.pp=2",
            "parallel.microbatches=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "parallel.microbatches" in result.stderr
