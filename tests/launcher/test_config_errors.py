"""Bad input exits with code 2 and one line naming the field, the value and the fix."""

import os
import subprocess
import sys

import pytest

from launcher.config import ConfigError
from launcher.run.compose import compose_config


def _train(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.train",
            "train.steps=1",
            "train.sample_tokens=0",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# one case per way a refusal reaches the user: validate(), the flavor and key checks before
# Hydra, a type error, the data and the machine preflight; the rest run in-process below
@pytest.mark.parametrize(
    "overrides,field",
    [
        (["parallel.dp=2"], "parallel.dp"),  # dp*pp*tp != world size (1)
        (["model=llama3_9b"], "model"),  # unknown flavor
        (["data=tokens", "data.path=/no/such/file.bin"], "data.path"),
        (["train.seq_len=abc"], "train.seq_len"),  # wrong type
        (["cluster.peak_tflops=312"], "cluster.peak_tflops"),  # moved to hardware.peak_tflops
        (["model=llama3_8b"], "model"),  # 120 GiB of state on one rank
        (["profile.ranks=[3]"], "profile.ranks"),  # outside the world (1 rank)
    ],
)
def test_refused_with_exit_2(overrides: list[str], field: str) -> None:
    result = _train(*overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "config error" in lines[0], result.stderr


def test_unreadable_tokenizer(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("hello world\n" * 100)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    result = _train("data=text", f"data.path={tmp_path}", f"data.tokenizer={bad}")
    assert result.returncode == 2 and "data.tokenizer" in result.stderr, result.stderr
    bad.chmod(0)
    if not os.access(bad, os.R_OK):  # root can read anything; the content check above still holds
        assert _train("data=text", f"data.path={tmp_path}", f"data.tokenizer={bad}").returncode == 2


# The same validate() the entry point runs (tested above through it), in-process: every number
# has a range; NaN and inf are refused where a finite value is needed.
@pytest.mark.parametrize(
    "overrides,field",
    [
        (["model.n_kv_heads=3"], "model.n_kv_heads"),  # 8 heads not divisible by 3
        (["optim.lr=-0.1"], "optim.lr"),
        (["train.global_batch_size=10", "parallel.microbatches=4"], "train.global_batch_size"),
        (["optim.lr=inf"], "optim.lr"),  # non-finite
        (["model.dim=1000000000"], "model.dim"),  # would overflow a storage
        (["optim.beta1=1.5"], "optim.beta1"),
        (["optim.beta2=-0.1"], "optim.beta2"),
        (["optim.eps=-1"], "optim.eps"),
        (["optim.eps=0"], "optim.eps"),
        (["optim.weight_decay=nan"], "optim.weight_decay"),
        (["model.norm_eps=nan"], "model.norm_eps"),
        (["model.rope_theta=0"], "model.rope_theta"),
        (["train.val_batches=0"], "train.val_batches"),
        (["model.multiple_of=0"], "model.multiple_of"),
        (["model.ffn_dim_multiplier=-1"], "model.ffn_dim_multiplier"),
        (["model.vocab_size=2000000000"], "model.vocab_size"),  # would allocate 512 GB
        (["data.max_bytes=0"], "data.max_bytes"),
        (["parallel.layers_per_stage=[3,3]"], "parallel.layers_per_stage"),  # pp=1: not ignored
        (["train.nonfinite=ignore"], "train.nonfinite"),
        (["observe.hang_timeout_s=-1"], "observe.hang_timeout_s"),
        (["observe.interval=0"], "observe.interval"),
        (["train.steps=5", "profile.steps=[4,6]"], "profile.steps"),  # past the run's end
        (["profile.steps=[0,2]"], "profile.steps"),  # steps count from 1
        (["profile.ranks=[0,1]"], "profile.ranks"),  # world size 1
    ],
)
def test_every_bad_value_names_its_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(overrides, world_size=1)
    assert err.value.field_name == field and str(err.value).startswith(f"config error: {field}=")


def test_document_options_need_an_end_of_document_id(tmp_path) -> None:
    from launcher.run.build import load_data
    from launcher.validate import DOCUMENT_OPTIONS

    tokens = tmp_path / "flat.bin"  # a flat token file: no end-of-document id
    tokens.write_bytes(bytes(range(256)) * 200)
    base = ["data=tokens", f"data.path={tokens}", "train.seq_len=16", "train.global_batch_size=4"]
    for name in DOCUMENT_OPTIONS:
        with pytest.raises(ConfigError, match=f"data.{name}=True: data.source=tokens has no end"):
            load_data(compose_config([*base, f"data.{name}=true"], 1))
    with pytest.raises(ConfigError, match="parallel.cp_comm='ring': data.document_mask on CUDA"):
        compose_config(
            ["device=cuda", "parallel.cp=2", "parallel.cp_comm=ring", "data.document_mask=true"], 2
        )
