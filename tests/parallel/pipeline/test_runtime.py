"""Pipeline split and placement: Megatron's interleaving, the V shape, no layer ever dropped."""

import pytest
import torch

from models.llama import ModelArgs, Transformer
from parallel.pipeline.registry import pipeline_layout
from parallel.pipeline.runtime import build_stage_module, layers_per_stage


def _layers_of_rank(n_layers: int, pp: int, v: int, rank: int, schedule: str) -> list[int]:
    with torch.device("meta"):
        whole = Transformer(ModelArgs(n_layers=n_layers, dim=32, n_heads=4))
    counts = layers_per_stage(n_layers, pp * v)
    return [
        int(k)
        for sid in pipeline_layout(schedule, pp, v).stage_ids(rank)
        for k in build_stage_module(whole, sid, counts).layers.keys()
    ]


def test_megatron_interleaving() -> None:
    assert _layers_of_rank(16, 4, 2, 0, "interleaved_1f1b") == [0, 1, 8, 9]
    assert _layers_of_rank(16, 4, 2, 3, "interleaved_1f1b") == [6, 7, 14, 15]


def test_v_shape_places_first_and_last_stage_on_rank_0() -> None:
    assert pipeline_layout("zbv", 4, 2).stage_ids(0) == [0, 7]
    assert _layers_of_rank(16, 4, 2, 0, "dualpipev") == [0, 1, 14, 15]


def test_ends_own_embedding_and_head_and_names_are_stable() -> None:
    with torch.device("meta"):
        whole = Transformer(ModelArgs(n_layers=4, dim=32, n_heads=4))
    first, last = (build_stage_module(whole, s, [2, 2]) for s in (0, 1))
    assert first.output is None and first.tok_embeddings is not None
    assert last.tok_embeddings is None and last.output is not None
    names = {n for m in (first, last) for n, _ in m.named_parameters()}
    assert names == {n for n, _ in whole.named_parameters()}


def test_balance_counts_embedding_and_head_and_refuses_remainders() -> None:
    assert layers_per_stage(8, 4) == [2, 2, 2, 2]
    assert layers_per_stage(6, 4) == [1, 2, 2, 1]  # embedding and head weigh one layer each
    assert layers_per_stage(5, 2, [1, 4]) == [1, 4]
    with pytest.raises(ValueError, match="layers_per_stage"):
        layers_per_stage(7, 4)
    with pytest.raises(ValueError, match="summing to"):
        layers_per_stage(8, 4, [2, 2, 2, 1])
