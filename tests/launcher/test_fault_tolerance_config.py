"""fault_tolerance.* refused before any process group starts: one line, exit code 2."""

import pytest

from launcher.config import ConfigError
from launcher.run.compose import compose_config
from launcher.run.ports import free_port
from tests.launcher.test_config_errors import _train

pytest.importorskip("torchft")

FT = ["parallel.dp=2", "parallel.dp_replicate=2", "fault_tolerance.enable=true"]


def test_unreachable_lighthouse_is_one_line_exit_2(tmp_path) -> None:
    address = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    result = _train(*FT, f"fault_tolerance.lighthouse={address}", f"hydra.run.dir={tmp_path / 'r'}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "fault_tolerance.lighthouse" in lines[0], result.stderr
    assert "unreachable" in lines[0] and not (tmp_path / "r").exists()  # no run was started


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["fault_tolerance.min_replicas=3"], "fault_tolerance.min_replicas"),  # > 2 groups
        (["fault_tolerance.min_replicas=0"], "fault_tolerance.min_replicas"),
        (["parallel.dp_replicate=1"], "parallel.dp_replicate"),  # no replicate dim to manage
        (["fault_tolerance.group_size=3"], "fault_tolerance.group_size"),
        (["fault_tolerance.replica_id=2"], "fault_tolerance.replica_id"),
        (["fault_tolerance.missing_batch=keep"], "fault_tolerance.missing_batch"),
        (["fault_tolerance.timeout_s=0"], "fault_tolerance.timeout_s"),
        (["fault_tolerance.lighthouse=nohost"], "fault_tolerance.lighthouse"),
        ([], "fault_tolerance.lighthouse"),  # none given and $TORCHFT_LIGHTHOUSE unset
    ],
)
def test_bad_fault_tolerance_names_its_field(
    overrides: list[str], field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    world = 2 if "parallel.dp_replicate=1" in overrides else 1  # one replica group's ranks
    with pytest.raises(ConfigError) as err:
        compose_config([*FT, *overrides], world_size=world)
    assert err.value.field_name == field, err.value
    assert "\n" not in str(err.value)
