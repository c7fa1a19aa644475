"""Documents inside packed sequences: block-causal attention leaks nothing across a document
boundary at any layout, a packed batch's loss is the token-weighted mean of its documents' own
losses, and a pipelined dp x pp run trains as one process (compiled: test_compile.py)."""

from pathlib import Path
from random import Random

import pytest
import torch

from data import DistributedBatchSampler
from data.documents import IGNORE_INDEX, document_inputs, mask_document_ends
from data.token_source import BYTE_EOS_ID
from launcher.run.build import load_data, model_args
from launcher.run.loop import train
from models.llama import ModelArgs, Transformer
from parallel.context_parallel import chunk_positions
from parallel.dtensor import full_value
from parallel.init import init_parameters
from parallel.mesh import build_mesh
from parallel.parallelize import ParallelOptions, parallelize
from parallel.pipeline.registry import pipeline_layout
from tests.helpers.run_training import make_config, train_validate_and_report
from tests.helpers.spawn import run_ranks
from tests.parallel.test_parity import BASE, Layout, _overrides, _relative, _run_cases

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=64)
SEQ, SEED, EOS = 32, 0, 0
A, B = slice(0, 9), slice(10, 32)  # document A's own tokens; B and C: all after A's EOS (9)
# (tp, cp, pp, cp_comm) on 2 ranks, besides one plain process
LEAK_LAYOUTS = {
    "tp2": (2, 1, 1, "all_gather"),
    "cp2": (1, 2, 1, "all_gather"),
    "cp2_ring": (1, 2, 1, "ring"),
    "pp2": (1, 1, 2, "all_gather"),
}
DOCUMENTS = ["data.document_mask=true", "data.reset_position_ids=true", "data.eod_mask_loss=true"]


def _packed(change_a: bool) -> torch.Tensor:
    """2 rows of 3 documents (EOS at 9 and 20); change_a redraws document A's tokens only."""
    tokens = torch.randint(1, ARGS.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(0))
    tokens[:, [9, 20]] = EOS
    if change_a:
        tokens[:, A] = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    return tokens


def _logits(model: torch.nn.Module, tokens: torch.Tensor, mask: bool = True) -> torch.Tensor:
    return model(tokens, **document_inputs(tokens, EOS, mask=mask, reset_positions=False))


@torch.no_grad()
def _leak_case() -> dict[str, list]:
    """On each of 2 ranks: (sequence positions, logits) for both inputs at every layout."""
    plain = Transformer(ARGS)
    init_parameters(plain, ARGS, SEED)
    inputs = [_packed(False), _packed(True)]
    out: dict[str, list] = {
        "plain": [(torch.arange(SEQ), _logits(plain, t)) for t in inputs],
        "plain_unmasked": [(torch.arange(SEQ), _logits(plain, t, mask=False)) for t in inputs],
    }
    for name, (tp, cp, pp, comm) in LEAK_LAYOUTS.items():
        mesh = build_mesh(torch.device("cpu"), 1, pp, tp, cp=cp)
        options = ParallelOptions(pipeline=pipeline_layout("1f1b", pp, 1, 2), cp_comm=comm)
        model = parallelize(ARGS, mesh, torch.device("cpu"), SEED, options)
        results = []
        for tokens in inputs:
            docs = document_inputs(tokens, EOS, mask=True, reset_positions=False)
            if model.schedule is None:  # the whole sequence's ids, this cp rank's chunks of tokens
                logits = full_value(model.chunks[0](model.local_sequence(tokens), **docs))
                positions = chunk_positions(SEQ, cp, mesh["cp"].get_local_rank())
                results.append((positions, logits))
            else:  # the ids reach every stage as step()'s keyword arguments
                args = (tokens,) if model.has_first_stage else ()
                target = tokens if model.has_last_stage else None  # its loss is not looked at
                logits = model.schedule.eval(*args, target=target, **docs)
                results.append((torch.arange(SEQ), logits) if model.has_last_stage else None)
        out[name] = results
    return out


def _assembled(per_rank: list[dict[str, list]], name: str, i: int) -> torch.Tensor:
    """Layout `name`'s logits of input i over the whole sequence, from the ranks holding them."""
    whole = torch.full((2, SEQ, ARGS.vocab_size), float("nan"))
    for results in per_rank:
        if results[name][i] is not None:
            positions, logits = results[name][i]
            whole[:, positions] = logits
    assert not whole.isnan().any(), name
    return whole


@pytest.mark.long(15)
def test_document_b_does_not_see_document_a() -> None:
    per_rank = run_ranks(2, _leak_case)
    plain = _assembled(per_rank, "plain", 0)
    # the test can fail: without the mask, B sees A
    unmasked = [_assembled(per_rank, "plain_unmasked", i) for i in (0, 1)]
    assert not torch.equal(unmasked[0][:, B], unmasked[1][:, B])
    for name in ("plain", *LEAK_LAYOUTS):
        first, changed = (_assembled(per_rank, name, i) for i in (0, 1))
        assert torch.equal(first[:, B], changed[:, B]), name  # bitwise
        assert not torch.equal(first[:, A], changed[:, A]), name
        assert (first - plain).abs().max() < 1e-5, name  # and the one process's logits


def _corpus(root: Path) -> str:
    """700 byte-level documents (files) of 1-6 words: several per 32-token window."""
    rng, words = Random(0), "the of and to in is it def class return import for".split()
    root.mkdir()
    for i in range(700):
        (root / f"{i:04d}.txt").write_text(
            " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        )
    return str(root)


def _packed_and_per_document(overrides: list[str]) -> tuple[float, float, int]:
    """The first step's loss of a real run, and the token-weighted mean of the losses of the
    documents of its batch, each run alone by a plain model with the same initial weights."""
    cfg = make_config(overrides)
    tokens = load_data(cfg)
    t = cfg.train
    first = train(cfg, tokens).losses[0]
    inputs, targets = DistributedBatchSampler(
        tokens.train, t.seq_len, t.global_batch_size, 0, 1, t.seed
    ).next_batch()
    args = model_args(cfg)
    model = Transformer(args)
    init_parameters(model, args, t.seed)
    targets = mask_document_ends(inputs, targets, BYTE_EOS_ID)
    total, counted, documents = 0.0, 0, 0
    with torch.no_grad():
        for x, y in zip(inputs, targets):
            ends = (x == BYTE_EOS_ID).nonzero().flatten().tolist()
            for start, end in zip([0] + [e + 1 for e in ends], ends + [len(x) - 1]):
                if start > end:
                    continue
                doc_x, doc_y = x[start : end + 1][None], y[start : end + 1][None]
                n = int((doc_y != IGNORE_INDEX).sum())
                if n:
                    loss = torch.nn.functional.cross_entropy(model(doc_x)[0], doc_y[0])
                    total, counted, documents = total + n * loss.item(), counted + n, documents + 1
    return first, total / counted, documents


def test_packed_loss_is_the_token_weighted_mean_of_documents(tmp_path: Path) -> None:
    overrides = [
        *BASE[:1],
        "train.steps=1",
        f"train.seq_len={SEQ}",
        "train.global_batch_size=4",
        "parallel.microbatches=2",  # microbatches of unequal counted tokens
        "train.sample_tokens=0",
        "device=cpu",
        "data.source=text",
        f"data.path={_corpus(tmp_path / 'docs')}",
        *DOCUMENTS,
    ]
    [(packed, per_document, documents)] = run_ranks(1, _packed_and_per_document, overrides)
    assert documents > 8  # several per window
    assert abs(packed - per_document) <= 1e-6, (packed, per_document)


@pytest.mark.long(15)
def test_dp2_pp2_with_documents_matches_one_process(tmp_path: Path) -> None:
    extra = ("data.source=text", f"data.path={_corpus(tmp_path / 'docs')}", *DOCUMENTS)
    layout = Layout(2, 2, 1, 1, ("1f1b",), extra)
    ref_losses, ref_weights, ref_val = run_ranks(
        1, train_validate_and_report, BASE + list(extra), 1
    )[0]
    per_rank = run_ranks(4, _run_cases, [_overrides(layout, "1f1b")], 4)
    weights: dict[str, torch.Tensor] = {}
    for [(losses, rank_weights, val, _)] in per_rank:
        assert max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)) <= 1e-5, losses
        assert abs(val - ref_val) / ref_val <= 1e-5, (val, ref_val)
        weights.update(rank_weights)
    assert weights.keys() == ref_weights.keys()
    assert max(_relative(weights[k], ref_weights[k]) for k in ref_weights) <= 1e-5
