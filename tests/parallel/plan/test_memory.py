"""The planner's activation estimate against what a real forward keeps alive on CPU, and its
model-state accounting (microbatches in flight per schedule: tests/parallel/pipeline/test_registry.py)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from models.llama import ModelArgs, Transformer
from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.loss import cross_entropy
from parallel.plan.layout import RankContext
from parallel.plan.memory import (
    GRAD_BYTES,
    OPTIMIZER_BYTES,
    WEIGHT_BYTES,
    activation_bytes,
    rebuilt_block_bytes,
    state_bytes,
)

DEBUG = ModelArgs(
    dim=64, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=256, multiple_of=32, max_seq_len=512
)


class _Created(TorchDispatchMode):
    """Remembers (weakly) every plain tensor an op produces, to see which are still alive later."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            local = getattr(t, "_local_tensor", t)  # a DTensor's shard on this rank
            if type(local) is torch.Tensor:
                self.refs.append(weakref.ref(local))
        return out


def live_activation_bytes(
    run: Callable[[], object], existing: list[torch.Tensor]
) -> tuple[int, object]:
    """Bytes of the storages created by `run()` that are still alive once it returns (what the
    autograd graph keeps for backward, each storage once), leaving out those of `existing`
    tensors (parameters, rope tables); returns them with run()'s result, kept alive."""
    skip = {t.untyped_storage().data_ptr() for t in existing}
    with _Created() as created:
        result = run()
    alive = {}
    for ref in created.refs:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in skip:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(alive.values()), result


def measured_and_held(
    model: torch.nn.Module, args: ModelArgs, recompute: str, batch: int, seq: int
) -> tuple[int, float, torch.Tensor]:
    """(bytes a real forward and loss keep alive on CPU in fp32, the planner's estimate of
    them, the loss) for `model` with `recompute` applied."""
    apply_activation_checkpointing(model, recompute)
    tokens = torch.randint(0, args.vocab_size, (batch, seq))
    cos, sin = model.rope(args.max_seq_len, tokens.device)
    measured, loss = live_activation_bytes(
        lambda: cross_entropy(model(tokens), tokens), [*model.parameters(), cos, sin]
    )
    whole = RankContext(args=args, layers=args.n_layers, tokens=batch * seq, recompute=recompute)
    estimate = activation_bytes(whole, in_flight=1, dtype_bytes=4)
    # after forward, nothing is being rebuilt yet: that part is a backward-time peak
    held = estimate - rebuilt_block_bytes(args, batch * seq, 1, False, recompute, dtype_bytes=4)
    return measured, held, loss


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_estimate_within_20_percent_of_cpu_measurement(recompute: str) -> None:
    torch.manual_seed(0)
    measured, held, loss = measured_and_held(Transformer(DEBUG), DEBUG, recompute, 2, 64)
    assert abs(held - measured) <= 0.2 * measured, (recompute, held, measured)
    loss.backward()  # the graph was real


def test_recompute_orders_the_estimates() -> None:
    # a first pipeline stage of two: 8 blocks, no head
    rank = RankContext(args=DEBUG, layers=8, tokens=1024, stage_ids=(0,), n_stages=2)
    none, sel, full = (
        activation_bytes(replace(rank, recompute=r), in_flight=4)
        for r in ("none", "selective", "full")
    )
    assert full < sel < none
    with pytest.raises(ValueError, match="recompute"):
        activation_bytes(replace(rank, recompute="some"), in_flight=4)


def test_tensor_and_sequence_parallel_divide_activations() -> None:
    # the last pipeline stage of two: 8 blocks and the head
    rank = RankContext(args=DEBUG, layers=8, tokens=1024, stage_ids=(1,), n_stages=2)
    one = activation_bytes(rank, in_flight=1)
    four = activation_bytes(replace(rank, tp=4), in_flight=1)
    four_sp = activation_bytes(replace(rank, tp=4, sequence_parallel=True), in_flight=1)
    assert one / 4 < four_sp < four < one


def test_fsdp_shards_model_state_and_keeps_a_working_copy() -> None:
    n, block, dp = 1000, 100, 10
    assert state_bytes(n, n, block, fsdp=False, pipelined=True, microbatches=4) == (
        WEIGHT_BYTES * n,
        GRAD_BYTES * n,
        OPTIMIZER_BYTES * n,
    )
    w, g, o = state_bytes(n, n // dp, block, fsdp=True, pipelined=False, microbatches=1)
    assert (w, g, o) == (
        WEIGHT_BYTES * (n // dp + 2 * block),
        GRAD_BYTES * (n // dp + block),
        OPTIMIZER_BYTES * n // dp,
    )
    w, g, _ = state_bytes(n, n // dp, block, fsdp=True, pipelined=True, microbatches=4)
    assert (w, g) == (
        WEIGHT_BYTES * (n + n // dp),
        GRAD_BYTES * (n + n // dp),
    )  # unsharded between microbatches


def _moe_args(**changes: object) -> ModelArgs:
    from launcher.run.compose import compose_config

    model = compose_config(["model=qwen3_moe_debug"]).model
    return ModelArgs(
        **{**{f: getattr(model, f) for f in ModelArgs.__dataclass_fields__}, **changes}
    )


@pytest.mark.parametrize(
    "changes",
    [{}, {"moe_z_loss_coeff": 0.0}, {"shared_expert_ffn_dim": 48}, {"norm_topk_prob": False}],
)
def test_moe_activation_estimate_matches_what_its_forward_keeps(changes: dict) -> None:
    from models.moe import MoE
    from parallel.plan.memory import moe_activation_elements, routing_bytes

    args = _moe_args(**changes)
    torch.manual_seed(0)
    moe = MoE(args)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    b, s = 4, 64
    x = torch.randn(b, s, args.dim, requires_grad=True)  # the norm's output, counted with it
    measured, out = live_activation_bytes(lambda: moe(x), [*moe.parameters(), x])
    measured -= out.numel() * 4  # the output, alive here because it is returned (a block adds it)
    estimate = b * s * (4 * moe_activation_elements(args, "none") + routing_bytes(args, "none"))
    # what is left out: per-expert counts and offsets, the balance loss's per-sequence terms
    assert 0 <= measured - estimate <= 0.01 * measured, (measured, estimate)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_moe_model_activation_estimate_under_recompute(recompute: str) -> None:
    from models.registry import model_spec

    args = _moe_args()
    torch.manual_seed(0)
    model = model_spec(args.family).build(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    measured, held, loss = measured_and_held(model, args, recompute, 2, 32)
    # selective keeps the router's matmul, not the routed experts' grouped ones
    assert abs(held - measured) <= 0.05 * measured, (recompute, held, measured)
    loss.backward()


@pytest.mark.parametrize("dp_shard", [False, True])
def test_expert_parallelism_splits_exactly_the_experts_state(dp_shard: bool) -> None:
    from parallel.plan.estimate import estimate
    from parallel.plan.layout import Cluster, Layout
    from parallel.plan.params import StageCounter

    args = _moe_args()
    counter = StageCounter(args)
    cluster = Cluster(1, 8, 80, 450, 50, 989)

    def plan(ep: int):
        layout = Layout(
            dp=2,
            pp=1,
            tp=1,
            virtual_stages=1,
            schedule="1f1b",
            microbatches=1,
            dp_shard=dp_shard,
            ep=ep,
        )
        rank = estimate(args, layout, cluster, global_batch_size=4, seq_len=64, counter=counter)
        return rank.ranks[0]

    one, two = plan(1), plan(2)
    whole = counter.whole()
    experts = whole.experts  # 4 layers x 8 experts x 3 x 64 x 32
    assert two.experts == experts // 2 and one.experts == experts
    assert two.activations == one.activations
    state = WEIGHT_BYTES + GRAD_BYTES + OPTIMIZER_BYTES
    saved = (one.weights + one.grads + one.optimizer) - (two.weights + two.grads + two.optimizer)
    if not dp_shard:  # replicated: each of the 2 GPUs holds all experts, or half under ep=2
        assert saved == state * experts // 2
    else:  # FSDP shards them 2 ways as ep does; ep=2 also drops them from FSDP's working copy
        # (2 blocks' weights, one block's gradients: no pipelining, one microbatch)
        assert one.params_local - two.params_local == 0
        assert saved == (2 * WEIGHT_BYTES + GRAD_BYTES) * whole.block_experts
