"""data=indexed refusals: one line `config error: data.paths=...`, exit 2, before any process group."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.indexed_dataset import IndexedWriter
from launcher.config import ConfigError
from launcher.run.build import load_data
from launcher.run.compose import compose_config


def _prefix(tmp_path: Path, name: str = "a", docs: int = 40, dtype: type = np.uint16) -> str:
    writer = IndexedWriter(tmp_path / name, dtype)
    for d in range(docs):
        writer.add_document(np.arange(1, 30 + d % 7) % 200)
    writer.finalize()
    return str(tmp_path / name)


def _load(*overrides: str) -> None:
    cfg = compose_config(
        ["data=indexed", "train.seq_len=16", "train.global_batch_size=4", *overrides], 1
    )
    load_data(cfg)


def _damage(prefix: str, case: str) -> None:
    idx = Path(prefix + ".idx")
    raw = bytearray(idx.read_bytes())
    if case == "dtype":
        raw[17] = 6  # DeepSpeed's uint16 code, float64 to Megatron
    else:
        raw = raw[:-5]  # a corrupt (truncated) index
    idx.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "case,words",
    [
        ("missing", "not found"),
        ("zero_weights", "sum to more than 0"),
        ("dtype", "DeepSpeed"),
        ("corrupt", "corrupt"),
        ("too_small", "fewer than one sample"),
    ],
)
def test_refused_before_any_process_group(tmp_path: Path, case: str, words: str) -> None:
    prefix = _prefix(tmp_path, docs=3 if case == "too_small" else 40)
    paths = f"[0.5,{prefix},0.5,{prefix}]"
    if case == "missing":
        paths = f"[{tmp_path / 'nope'}]"
    elif case == "zero_weights":
        paths = f"[0,{prefix},0,{prefix}]"
    elif case in ("dtype", "corrupt"):
        _damage(prefix, case)
    with pytest.raises(ConfigError) as err:
        _load(f"data.paths={paths}", *(["train.seq_len=128"] if case == "too_small" else []))
    assert err.value.field_name == "data.paths" and words in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["data=tokens", "data.path=/tmp", "data.paths=[a]"], "data.paths"),  # not ignored
        (["data=indexed", "data.paths=[a]", "data.path=/tmp"], "data.path"),
        (["data=indexed", "data.paths=[0.5,1.0]"], "data.paths"),  # weights without prefixes
    ],
)
def test_options_that_do_not_apply_are_refused(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(overrides, 1)
    assert err.value.field_name == field


def test_entry_point_exits_2_on_a_deepspeed_file(tmp_path: Path) -> None:
    prefix = _prefix(tmp_path)
    _damage(prefix, "dtype")
    result = subprocess.run(
        [sys.executable, "-m", "launcher.train", "data=indexed", f"data.paths=[{prefix}]"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: data.paths=")
    assert not (tmp_path / "outputs").exists()  # refused before its first step: no run folder
