"""`python -m launcher.preprocess`: every input kind, tokenizers, workers, and refusals."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.indexed_dataset import IndexedDataset
from launcher.preprocess import main
from tests.data.test_text_corpus import _train_bpe

TEXTS = ["def f(x):\n    return x\n", "hello world", "", "the quick brown fox", "é ü 中文"]


def _jsonl(path: Path, texts: list[str], key: str = "text") -> None:
    lines = "".join(json.dumps({key: t, "n": i}) + "\n" for i, t in enumerate(texts))
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write(lines)


def _documents(prefix: Path) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_folder_of_every_format_byte_level(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _jsonl(corpus / "a.jsonl", TEXTS[:2])
    _jsonl(corpus / "b.jsonl.gz", TEXTS[2:4])  # the empty document is skipped
    raw = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[4:]).encode()
    (corpus / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": ["parquet doc", None]}), corpus / "d.parquet")
    assert main(["--input", str(corpus), "--output-prefix", str(tmp_path / "out/all")]) == 0
    kept = [t for t in TEXTS if t] + ["parquet doc"]
    assert _documents(tmp_path / "out/all") == [list(t.encode()) + [0] for t in kept]
    meta = json.loads((tmp_path / "out/all.json").read_text())
    assert meta["documents"] == 5 and meta["eos_id"] == 0 and meta["tokenizer"] == "bytes"
    assert IndexedDataset(tmp_path / "out/all").dtype == np.uint16  # Megatron's pick for < 65500


def test_saved_hugging_face_dataset(tmp_path: Path) -> None:
    import datasets

    saved = datasets.Dataset.from_dict({"body": ["first doc", "", "second"], "n": [1, 2, 3]})
    saved.save_to_disk(str(tmp_path / "hf"), num_shards=2)
    args = ["--input", str(tmp_path / "hf"), "--output-prefix", str(tmp_path / "o")]
    assert main([*args, "--text-key", "body"]) == 0
    assert _documents(tmp_path / "o") == [list(b"first doc") + [0], list(b"second") + [0]]


def test_tokenizer_and_two_workers_write_the_same_pair(tmp_path: Path) -> None:
    tok = _train_bpe(tmp_path)
    from tokenizers import Tokenizer

    _jsonl(tmp_path / "a.jsonl", TEXTS * 300)  # several batches, so order across workers matters
    outs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        args = ["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(prefix)]
        assert main([*args, "--tokenizer", tok, "--eos-id", "5", "--workers", str(workers)]) == 0
        outs.append([(tmp_path / f"w{workers}{s}").read_bytes() for s in (".bin", ".idx")])
    assert outs[0] == outs[1]
    first = _documents(tmp_path / "w1")[0]
    expected = Tokenizer.from_file(tok).encode(TEXTS[0], add_special_tokens=False).ids
    assert first == expected + [5]


def _stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "case", ["missing", "empty", "text_key", "late_text_key", "no_eos", "workers"]
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "a.jsonl"
    _jsonl(src, ["", ""] if case == "empty" else TEXTS)
    args = ["--input", str(src), "--output-prefix", str(tmp_path / "o")]
    field = {"missing": "--input", "empty": "--input"}.get(case, "--text-key")
    if case == "late_text_key":  # found by a worker, in a later batch: reported alike
        with open(src, "a") as f:
            f.write("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 300))
            f.write(json.dumps({"body": "no text here"}) + "\n")
        args += ["--workers", "2"]
    if case == "missing":
        args[1] = str(tmp_path / "nope.jsonl")
    elif case == "text_key":
        args += ["--text-key", "body"]
    elif case == "no_eos":
        args, field = [*args, "--tokenizer", _train_bpe(tmp_path)], "--eos-id"
    elif case == "workers":
        args, field = [*args, "--workers", "0"], "--workers"
    assert main(args) == 2
    line = _stderr_line(capsys)
    assert line.startswith(f"config error: {field}=") and ": " in line[len(field) + 14 :]
    assert not list(tmp_path.glob("o.*"))  # nothing that looks like output, not even temp files


def test_interrupted_run_leaves_no_pair_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import data.indexed_dataset as indexed

    _jsonl(tmp_path / "a.jsonl", TEXTS * 200)
    args = ["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "o")]
    assert main(args) == 0
    calls = []

    def dying(self: indexed.IndexedWriter, tokens: np.ndarray, lengths: np.ndarray) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if stopped mid-way through the rewrite
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes())

    monkeypatch.setattr(indexed.IndexedWriter, "add_documents", dying)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not (tmp_path / "o.idx").exists() and not list(tmp_path.glob("*.tmp"))


def test_entry_point_exits_2() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.preprocess",
            "--input",
            "/no/such",
            "--output-prefix",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("config error: --input='/no/such': ")
