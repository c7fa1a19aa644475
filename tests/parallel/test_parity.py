"""Every schedule on several (dp, pp, cp, tp, v) layouts gives the single-process losses and weights.

Each layout is one test: its schedules run one after another inside one set of spawned gloo
ranks (forked from a server that imported torch once, so a spawn costs little).
"""

from typing import NamedTuple

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook

from models.llama import TransformerBlock
from tests.helpers.run_training import make_config, train_validate_and_report
from tests.helpers.spawn import run_ranks

# optim.eps=1e-5: Adam's first updates are ~lr*sign(g), so with eps=1e-8 an element whose
# gradient is ~1e-9 (pure rounding noise) moves by a full lr step in one layout and the other
# way in another. A slightly larger eps keeps such elements still; a wrong gradient anywhere
# still moves weights by ~lr and fails the 1e-5 check by orders of magnitude.
SEQ_LEN = 16
BASE = [
    "model=debug",
    "train.steps=3",
    f"train.seq_len={SEQ_LEN}",
    "train.global_batch_size=32",
    "train.sample_tokens=0",
    "train.val_interval=1000",
    "train.val_batches=1",  # one batch of 32 windows through the eval schedules: enough to compare
    "optim.warmup_steps=1",
    "optim.eps=1e-5",
    "device=cpu",
]
ONE_STAGE = ("gpipe", "1f1b")
MULTI_STAGE = ("interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv", "dualpipev")
ZERO_BUBBLE = ("zb_h1", "zb_h2", "zb_1p", "zb_2p")  # tridist's orders on torch's runtime
SP = ("parallel.sequence_parallel=true",)
TIED = ("model.tie_embeddings=true",)  # against a tied single-process reference
# a searched order at given unequal costs (a slower last stage, cheap weight gradients)
COSTS = ("parallel.stage_costs=[[1.0,1.0,0.5],[1.5,1.5,0.75]]",)
RING = ("parallel.cp_comm=ring",)
HSDP = ("parallel.dp_replicate=2",)
DDP = ("parallel.dp_shard=false",)  # replicate over dp (and cp) instead of FSDP2
# Qwen3 dense (tied embeddings): its per-head QK-norms see only a tp rank's heads, so their
# replicated weights' gradients must be summed over tp
QWEN3 = ("model=qwen3_debug",)


class Layout(NamedTuple):
    dp: int
    pp: int
    tp: int
    v: int
    schedules: tuple[str, ...]
    extra: tuple[str, ...] = ()  # further overrides, e.g. SP
    cp: int = 1  # context parallelism: each sequence split across cp ranks


# pp=1 layouts name one schedule only: without a pipeline it is not used
LAYOUTS = {
    2: [
        Layout(1, 2, 1, 1, ONE_STAGE),
        Layout(1, 2, 1, 1, ZERO_BUBBLE),
        Layout(1, 2, 1, 1, ("zb_2p",), COSTS),
        Layout(1, 2, 1, 2, MULTI_STAGE),
        Layout(1, 1, 2, 1, ("1f1b",), SP),  # SP without dp: norm grads stay Partial
        # tied embedding and head on two ranks (gradients summed over a pair) and on one (V)
        Layout(1, 2, 1, 1, ("1f1b",), TIED),
        Layout(1, 2, 1, 2, ("zbv", "zbv_torch"), TIED),  # tridist's ZB-V order and torch's
        # stages holding only the embedding, or only the norm and head
        Layout(1, 2, 1, 2, ("interleaved_1f1b",), TIED + ("parallel.layers_per_stage=[0,3,5,0]",)),
        # 8 blocks into 6 stages: no even split, the cost model's
        Layout(1, 2, 1, 3, ("interleaved_1f1b",), ("parallel.layers_per_stage=auto",)),
        # the ring's custom op under selective recompute (all-gather: 4 ranks), its gradients
        # all-reduced over cp by replication (DDP-style), not FSDP2
        Layout(
            1, 1, 1, 1, ("1f1b",), RING + DDP + ("model.activation_checkpointing=selective",), cp=2
        ),
    ],
    4: [
        Layout(1, 4, 1, 2, MULTI_STAGE),
        Layout(1, 4, 1, 1, ("zb_h1", "zb_2p")),
        Layout(2, 1, 2, 1, ("1f1b",), SP),  # SP under FSDP2, which reduces norm grads across tp
        Layout(1, 2, 2, 1, ("gpipe",), QWEN3 + SP),  # sequence-sharded activations between stages
        Layout(1, 1, 2, 1, ("1f1b",), SP + RING, cp=2),  # heads over tp, sequence over cp
        Layout(1, 2, 1, 1, ("1f1b",), cp=2),  # stages exchange cp-sharded activations
        Layout(1, 2, 1, 2, ("interleaved_1f1b",), RING, cp=2),
        Layout(4, 1, 1, 1, ("1f1b",), HSDP),  # 2 replica groups x 2 FSDP2 shards
    ],
    8: [
        Layout(2, 2, 2, 1, ONE_STAGE),
        Layout(2, 2, 2, 1, ("zb_h2", "zb_1p")),  # under FSDP2 over dp and TP
        Layout(2, 2, 2, 2, MULTI_STAGE),  # with (1, 4, 1, 2): pp=4 and dp x tp for each
        Layout(1, 2, 4, 1, ONE_STAGE),
        Layout(4, 2, 1, 1, ONE_STAGE, HSDP),  # HSDP under a pipeline: 2 replicas x 2 shards
        Layout(2, 2, 2, 1, ("1f1b",), SP),
        Layout(2, 1, 2, 1, ("1f1b",), cp=2),  # all-gather K/V across cp, heads across tp
    ],  # HSDP x cp (sharded over cp inside a replica group): tests/parallel/checkpoint; the
    # tied pairs of every (dp, tp) coordinate: Qwen3 (tied) at 2 x 2 x 2 in test_qwen3_3d.py
}


def _microbatches(layout: Layout) -> int:
    """The fewest that still give every schedule a steady state: 2 per pipeline rank and at least
    one per stage, rounded up to a power of 2 that splits the batch (each microbatch costs every
    rank an action, and 8 ranks share 2 cores here); 2 without a pipeline, so gradients still
    accumulate over microbatches."""
    least = max(2, 2 * layout.pp, layout.pp * layout.v)
    return 1 << (least - 1).bit_length()


def _base(extra: tuple[str, ...]) -> list[str]:
    """BASE, with the model group a layout names instead of its own."""
    model = [o for o in extra if o.startswith("model=")]
    return [o for o in BASE if not (model and o.startswith("model="))] + model


def _reference_overrides(layout: Layout) -> list[str]:
    """The single-process run a layout is compared with: the same model, tied or not."""
    return _base(layout.extra) + [o for o in layout.extra if o in TIED]


def _overrides(layout: Layout, schedule: str) -> list[str]:
    return _base(layout.extra) + [
        f"parallel.dp={layout.dp}",
        f"parallel.pp={layout.pp}",
        f"parallel.tp={layout.tp}",
        f"parallel.cp={layout.cp}",
        f"parallel.virtual_stages={layout.v}",
        f"parallel.schedule={schedule}",
        f"parallel.microbatches={_microbatches(layout)}",
        *(o for o in layout.extra if not o.startswith("model=")),
    ]


def _train_case(
    overrides: list[str], world: int
) -> tuple[list[float], dict[str, torch.Tensor], float, set[int]]:
    """Losses, final weights and validation loss, plus the sequence lengths of the blocks' outputs on this rank."""
    lengths: set[int] = set()

    def record(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        if isinstance(module, TransformerBlock):
            lengths.add(output.shape[1])

    handle = register_module_forward_hook(record)
    try:
        return (*train_validate_and_report(overrides, world), lengths)
    finally:
        handle.remove()


def _run_cases(
    cases: list[list[str]], world: int
) -> list[tuple[list[float], dict[str, torch.Tensor], float, set[int]]]:
    return [_train_case(overrides, world) for overrides in cases]


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, ...], tuple[list[float], dict[str, torch.Tensor], float]]:
    """Single-process runs by their overrides, each run once when a layout first needs it."""
    return {}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _layout_id(layout: Layout) -> str:
    """e.g. dp1pp2tp1v2-tie_embeddings-layers_per_stage=[0,3,5,0]-interleaved_1f1b"""
    tags = []
    for override in layout.extra:
        key, value = override.split("=", 1)
        tags.append(key.split(".")[-1] + ("" if value == "true" else f"={value}"))
    if layout.schedules not in (ONE_STAGE, MULTI_STAGE):
        tags.append(",".join(layout.schedules))
    cp = f"cp{layout.cp}" if layout.cp > 1 else ""
    return "-".join([f"dp{layout.dp}pp{layout.pp}{cp}tp{layout.tp}v{layout.v}", *tags])


@pytest.mark.long(40)
@pytest.mark.parametrize(
    "world,layout",
    [(w, layout) for w in sorted(LAYOUTS) for layout in LAYOUTS[w]],
    ids=lambda x: _layout_id(x) if isinstance(x, Layout) else str(x),
)
def test_schedules_and_layouts_match_single_process(
    world: int, layout: Layout, references: dict
) -> None:
    key = tuple(_reference_overrides(layout))
    if key not in references:
        references[key] = train_validate_and_report(list(key), 1)
    ref_losses, ref_weights, ref_val = references[key]
    tied = make_config(list(key)).model.tie_embeddings
    cases = [(layout, s) for s in layout.schedules]
    per_rank = run_ranks(world, _run_cases, [_overrides(*c) for c in cases], world)
    for i, case in enumerate(cases):
        # the residual stream between blocks is split by sequence across cp, and across tp
        # only under SP
        seq_between_blocks = SEQ_LEN // layout.cp // (layout.tp if SP[0] in layout.extra else 1)
        weights: dict[str, torch.Tensor] = {}
        for rank_results in per_rank:
            losses, rank_weights, val, lengths = rank_results[i]
            rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
            assert len(losses) == 3 and rel <= 1e-5, (case, losses, ref_losses)
            # evaluation runs forward-only orders (V shapes have their own): same loss too
            assert abs(val - ref_val) / ref_val <= 1e-5, (case, val, ref_val)
            assert lengths == {seq_between_blocks}, (case, lengths)
            weights.update(rank_weights)
        if tied and layout.pp > 1:  # the head's copy of the tied matrix: equal to it, too
            ref_weights = {**ref_weights, "output.weight": ref_weights["tok_embeddings.weight"]}
        assert weights.keys() == ref_weights.keys(), case  # no layer dropped or duplicated
        worst = max(ref_weights, key=lambda k: _relative(weights[k], ref_weights[k]))
        assert _relative(weights[worst], ref_weights[worst]) <= 1e-5, (case, worst)
