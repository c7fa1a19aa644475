"""The MoE feed-forward (models/moe.py) against a token-by-token reference, in one process."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.args import ModelArgs
from models.moe import MoE, grouped_linear
from parallel.expert_load import expert_load

ARGS = ModelArgs(dim=16, n_experts=4, experts_per_token=2, moe_ffn_dim=8, moe_z_loss_coeff=1e-3)


def _moe(seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(ARGS)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def test_each_token_gets_the_weighted_sum_of_its_top_k_experts() -> None:
    moe = _moe()
    x = torch.randn(2, 5, ARGS.dim)
    out = moe(x)
    e = moe.experts
    for b in range(2):
        for t in range(5):
            probs = moe.router(x[b, t]).softmax(-1)
            weights, chosen = probs.topk(2)
            weights = weights / weights.sum()
            expected = sum(
                w * (e.w2[i] @ (F.silu(e.w1[i] @ x[b, t]) * (e.w3[i] @ x[b, t])))
                for w, i in zip(weights, chosen.tolist())
            )
            torch.testing.assert_close(out[b, t], expected, rtol=1e-5, atol=1e-6)


def test_the_loop_over_experts_equals_the_grouped_matmul() -> None:
    x, counts = torch.randn(7, 16), torch.tensor([3, 0, 4])
    weight = torch.randn(3, 8, 16)
    grouped = grouped_linear(x, weight, counts)  # 16-byte rows: torch._grouped_mm
    odd = grouped_linear(x[:, :15], weight[:, :, :15], counts)  # unaligned: the loop
    rows = [x[:3] @ weight[0].T, x[3:] @ weight[2].T]
    torch.testing.assert_close(grouped, torch.cat(rows))
    torch.testing.assert_close(
        odd, torch.cat([x[:3, :15] @ weight[0, :, :15].T, x[3:, :15] @ weight[2, :, :15].T])
    )


def test_auxiliary_losses_train_the_router_alike_for_a_batch_and_its_halves() -> None:
    """The balance and z-losses are means over sequences and tokens: a whole batch's router
    gradient equals the mean of its two halves' (what microbatches and dp ranks rely on)."""
    x = torch.randn(4, 6, ARGS.dim)

    def router_grad(batches: list[torch.Tensor], scale: float) -> torch.Tensor:
        moe = _moe()
        moe.aux_loss_scale = scale
        for part in batches:
            moe(part).sum().mul(0).backward()  # the main loss contributes nothing
        return moe.router.weight.grad

    whole = router_grad([x], 1.0)
    halves = router_grad(list(x.chunk(2)), 0.5)
    assert whole.abs().max() > 0  # the auxiliary losses alone moved the router
    torch.testing.assert_close(whole, halves, rtol=1e-5, atol=1e-7)


def test_expert_load_counts_every_routed_token_once() -> None:
    moe = _moe()
    moe(torch.randn(3, 5, ARGS.dim))
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleDict({"0": torch.nn.Module()})
    holder.layers["0"].feed_forward = moe
    assert int(moe.load.sum()) == 3 * 5 * 2  # tokens x k
    busiest = (moe.load.max() / moe.load.float().mean()).item()
    load = expert_load([holder], n_layers=1, n_experts=4)
    assert abs(load["moe/load_max_over_mean"] - busiest) < 1e-6
    assert load["moe/load_max_over_mean"] >= 1 >= load["moe/load_min_over_mean"]
    assert load["moe/aux_loss"] > 0 and int(moe.load.sum()) == 0  # read and reset
