"""Megatron's blend semantics, packed samples over shuffled documents, and resharding the position."""

from pathlib import Path

import numpy as np
import pytest
import torch

from data import DistributedBatchSampler, validation_batches
from data.blend import CHUNK, BlendIndex, greedy_blend, parse_blend
from data.indexed_dataset import IndexedDataset, IndexedWriter
from data.indexed_source import build_indexed_source
from data.packing import BlendedSamples, PackedDocuments

EOS = 0


def test_greedy_blend_matches_megatron_golden() -> None:
    # megatron-core's build_blending_indices for weights [0.3, 0.7] and 10 samples
    sources, local = greedy_blend([0.3, 0.7], 0, 10, [0, 0])
    assert sources.tolist() == [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]
    assert local.tolist() == [0, 0, 1, 2, 1, 3, 4, 2, 5, 6]


def test_lazy_blend_index_equals_the_one_shot_index_across_chunks() -> None:
    weights = [0.2, 0.5, 0.3]
    sources, local = greedy_blend(weights, 0, 2 * CHUNK + 5, [0, 0, 0])
    index = BlendIndex(weights)
    for g in (2 * CHUNK + 4, 3, CHUNK, CHUNK - 1):  # out of order: resume and validation jump
        assert index.lookup(g) == (sources[g], local[g])


@pytest.mark.parametrize(
    "paths,weights,prefixes",
    [
        ([0.3, "a", 0.7, "b"], [0.3, 0.7], ["a", "b"]),
        (["3", "a", "1", "b"], [0.75, 0.25], ["a", "b"]),  # strings from the command line
        (["a", "b", "c"], [1 / 3] * 3, ["a", "b", "c"]),  # prefixes only: equal weights
        (["a", "b"], [0.5, 0.5], ["a", "b"]),
    ],
)
def test_parse_blend(paths: list, weights: list[float], prefixes: list[str]) -> None:
    got_w, got_p = parse_blend(paths)
    assert got_p == prefixes and np.allclose(got_w, weights)


@pytest.mark.parametrize("paths", [[], [0, "a", 0, "b"], [-1, "a", 2, "b"], [0.5, 1.0]])
def test_parse_blend_refuses(paths: list) -> None:
    with pytest.raises(ValueError):
        parse_blend(paths)


def _corpus(path: Path, n_docs: int, base: int) -> IndexedDataset:
    """Documents of 3..12 tokens whose ids tell (document, position) apart, each ending in EOS."""
    writer = IndexedWriter(path, np.uint16)
    rng = np.random.default_rng(base)
    for d in range(n_docs):
        writer.add_document(np.append(base + 100 * d + np.arange(rng.integers(3, 12)) + 1, EOS))
    writer.finalize()
    return IndexedDataset(path)


def test_packed_samples_cover_each_epoch_of_shuffled_documents(tmp_path: Path) -> None:
    ds = _corpus(tmp_path / "a", 40, 1000)
    packed = PackedDocuments(ds, 0, 40, 8, key=0, shuffle=True)

    def stream(seed: int, epoch: int) -> np.ndarray:
        order = np.random.default_rng([seed, 0, epoch]).permutation(40)
        return np.concatenate([ds[int(d)] for d in order])

    n = packed.n_samples
    assert n == (int(ds.lengths.sum()) - 1) // 8
    for epoch in (0, 1):
        expected = stream(5, epoch)
        for j in range(n):
            row = packed.row(epoch * n + j, seed=5)
            assert row.tolist() == expected[j * 8 : j * 8 + 9].tolist()  # seq_len + 1, overlap 1
    assert (packed.row(0, 5) == EOS).any() or (packed.row(1, 5) == EOS).any()  # EOS kept
    assert packed.row(0, 5).tolist() != packed.row(n, 5).tolist()  # epochs reshuffle


def test_sampler_position_reshards_from_dp4_to_dp2(tmp_path: Path) -> None:
    a, b = _corpus(tmp_path / "a", 30, 1000), _corpus(tmp_path / "b", 30, 5000)
    blend = BlendedSamples(
        [PackedDocuments(a, 0, 30, 8, 0, True), PackedDocuments(b, 0, 30, 8, 1, True)], [0.3, 0.7]
    )
    gbs, seed = 8, 3
    four = [DistributedBatchSampler(blend, 8, gbs, r, 4, seed) for r in range(4)]
    first = [torch.cat([s.next_batch()[0] for s in four]) for _ in range(2)]
    two = [DistributedBatchSampler(blend, 8, gbs, r, 2, seed) for r in range(2)]
    for s in two:
        s.load_state_dict(four[0].state_dict())
    after = [torch.cat([s.next_batch()[0] for s in two]) for _ in range(2)]
    expected = blend.rows(range(4 * gbs), seed)[:, :-1]
    assert torch.equal(torch.cat(first + after), expected)
    picked = blend.source_samples(range(10))
    assert [k for k, _ in picked] == [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]  # Megatron's blend order


def test_indexed_source_splits_documents_and_validates_in_order(tmp_path: Path) -> None:
    _corpus(tmp_path / "a", 40, 1000)
    source = build_indexed_source([str(tmp_path / "a")], None, 0.25, 8)
    ds = IndexedDataset(tmp_path / "a")
    assert source.vocab_size == (int(ds.bin.max()) + 1 + 63) // 64 * 64  # no sidecar: scanned
    assert source.eos_id is None and not source.has_text  # Megatron-made files say neither
    train, val = source.train, source.val
    assert isinstance(train, BlendedSamples) and isinstance(val, BlendedSamples)
    assert train.sources[0].lengths.size == 30 and val.sources[0].lengths.size == 10
    batches = validation_batches(val, 8, 4, 2)
    # validation reads the held-out documents 30..39 in file order, unshuffled
    held_out = np.concatenate([ds[d] for d in range(30, 40)])
    assert batches[0][0][0].tolist() == held_out[:8].tolist()
    assert batches[1][1][-1].tolist() == held_out[7 * 8 + 1 : 8 * 8 + 1].tolist()
