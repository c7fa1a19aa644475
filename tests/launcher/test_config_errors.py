"""Bad input exits with code 2 and one line naming the field, the value and the fix."""

import os
import subprocess
import sys

import pytest


def _train(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.train", "train.steps=1", "train.sample_tokens=0", *overrides],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("overrides,field", [
    (["parallel.dp=2"], "parallel.dp"),                       # dp*pp*tp != world size (1)
    (["model.n_kv_heads=3"], "model.n_kv_heads"),               # 8 heads not divisible by 3
    (["optim.lr=-0.1"], "optim.lr"),
    (["model=llama3_9b"], "model"),                            # unknown flavor
    (["data=tokens", "data.path=/no/such/file.bin"], "data.path"),
    (["train.global_batch_size=10", "parallel.microbatches=4"], "train.global_batch_size"),
    (["train.seq_len=abc"], "train.seq_len"),                       # wrong type
    (["cluster.peak_tflops=312"], "cluster.peak_tflops"),       # moved to hardware.peak_tflops
])
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
