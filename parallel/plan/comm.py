"""Bytes each GPU sends per training step over TP, PP, CP, EP and DP, and the link each group
uses.

Volumes are per GPU for ring collectives: an all-reduce of N bytes over n ranks moves
2(n-1)/n N, an all-gather or a reduce-scatter (n-1)/n N. The TP counts are what the DTensor
plan (models/tp_plan.py) issues in torch 2.13, counted with CommDebugMode on real gloo ranks in
tests/launcher/test_plan.py.

Expert parallelism (ep > 1) sends each token-expert pair's row to the GPU holding the expert
and back: an all-to-all before the experts (dispatch) and one after (combine), and the mirror
image of each in backward. Routing is taken as balanced, so (ep-1)/ep of the rows leave the
GPU. The routed experts' gradients are then all-reduced over the dp*cp/ep GPUs holding the
same experts (they are not FSDP-sharded); every other parameter's DP traffic is as without EP.
"""

from __future__ import annotations

from parallel.plan.layout import Cluster, RankContext
from parallel.plan.memory import ACTIVATION_BYTES, GRAD_BYTES, WEIGHT_BYTES

# without SP: forward all-reduces after wo and w2; backward all-reduces of the input gradients
# of wq, wk, wv, w1 and w3 (each column-wise linear reduces its own)
ALL_REDUCES_PER_BLOCK = {"forward": 2, "backward": 5}
# with SP: an all-gather before attention and feed-forward and a reduce-scatter after each,
# mirrored in backward
GATHERS_AND_SCATTERS_PER_BLOCK = {"forward": 4, "backward": 4}
# per MoE block and microbatch: the dispatch and combine all-to-alls, forward and backward
ALL_TO_ALLS_PER_MOE_BLOCK = {"forward": 2, "backward": 2}
# per end (embedding, head): without SP the embedding all-reduces its output and the head its
# input gradient; with SP each also has the mirror image in the other pass
END_COLLECTIVES = {False: 1, True: 2}


def all_reduce_factor(n: int) -> float:
    """Bytes a ring all-reduce moves per GPU, per byte reduced."""
    return 2 * (n - 1) / n


def gather_factor(n: int) -> float:
    """Bytes a ring all-gather or reduce-scatter moves per GPU, per byte of the full tensor."""
    return (n - 1) / n


def tp_collectives(*, sequence_parallel: bool, layers: int, ends: int, recompute: str) -> int:
    """TP collectives of one microbatch on one GPU: all-reduces, or under SP all-gathers plus
    reduce-scatters (the loss's few token-sized all-reduces are left out)."""
    counts = GATHERS_AND_SCATTERS_PER_BLOCK if sequence_parallel else ALL_REDUCES_PER_BLOCK
    per_block = (
        counts["forward"] + counts["backward"] + (counts["forward"] if recompute != "none" else 0)
    )
    return layers * per_block + ends * END_COLLECTIVES[sequence_parallel]


def tp_bytes(rank: RankContext) -> float:
    """TP traffic of one GPU per step: its blocks and ends (embedding, head) over all
    microbatches; recompute repeats the blocks' forward collectives."""
    tp, sp = rank.tp, rank.sequence_parallel
    if tp == 1:
        return 0.0
    hidden = rank.tokens * rank.args.dim * ACTIVATION_BYTES  # one full activation of a microbatch
    factor = gather_factor(tp) if sp else all_reduce_factor(tp)
    ops = tp_collectives(
        sequence_parallel=sp, layers=rank.layers, ends=rank.ends, recompute=rank.recompute
    )
    return rank.microbatches * hidden * factor * ops


def pp_bytes(rank: RankContext) -> float:
    """PP traffic of one GPU per step: each chunk sends its output forward and the gradient of
    its input backward, once per microbatch (a sequence shard under SP)."""
    if not rank.pipelined:
        return 0.0
    shard = rank.tp if rank.sequence_parallel else 1
    hidden = rank.tokens * rank.args.dim * ACTIVATION_BYTES / shard
    last = rank.n_stages - 1
    sends = sum((sid != last) + (sid != 0) for sid in rank.stage_ids)
    return rank.microbatches * sends * hidden


def cp_bytes(rank: RankContext, dtype_bytes: int = ACTIVATION_BYTES) -> float:
    """CP traffic one GPU sends per step: per block and microbatch of its local tokens,
    its K/V block (this TP rank's K/V heads, un-repeated: GQA keeps it small) reaches the other
    cp-1 ranks. all_gather: an all-gather in forward, a reduce-scatter of its gradient in
    backward. ring: cp-1 sends of the block forward, cp-1 again in backward plus cp sends of
    its fp32 gradient, which follows it around the ring. Recompute repeats the forward."""
    cp, args = rank.cp, rank.args
    if cp == 1:
        return 0.0
    elements = 2 * args.kv_heads / rank.tp * args.head_dim * rank.tokens
    block = elements * dtype_bytes
    forward = (cp - 1) * block
    if rank.cp_comm == "all_gather":
        backward = (cp - 1) * block
    else:
        backward = (cp - 1) * block + cp * elements * GRAD_BYTES
    per_block = forward * (1 + (rank.recompute != "none")) + backward
    return rank.microbatches * rank.layers * per_block


def all_to_all_bytes(
    *,
    tokens: int,
    dim: int,
    top_k: int,
    ep: int,
    moe_layers: int,
    microbatches: int = 1,
    recompute: str = "none",
    dtype_bytes: int = ACTIVATION_BYTES,
) -> float:
    """EP's all-to-all bytes one GPU sends per step: per MoE block and microbatch of `tokens`
    tokens, its top_k rows of `dim` elements per token go to the experts' GPUs (all but the
    1/ep that stay) and come back, forward and backward; recompute repeats the forward's."""
    if ep == 1:
        return 0.0
    a2a = ALL_TO_ALLS_PER_MOE_BLOCK
    calls = a2a["forward"] * (1 + (recompute != "none")) + a2a["backward"]
    rows = tokens * top_k * (ep - 1) / ep
    return microbatches * moe_layers * calls * rows * dim * dtype_bytes


def ep_bytes(rank: RankContext, dtype_bytes: int = ACTIVATION_BYTES) -> float:
    """EP's all-to-all bytes of one GPU of the rank per step, over its MoE blocks' microbatches
    (every TP rank sends its own: TP leaves the MoE whole)."""
    return all_to_all_bytes(
        tokens=rank.tokens,
        dim=rank.args.dim,
        top_k=rank.args.experts_per_token,
        ep=rank.ep,
        moe_layers=rank.moe_layers,
        microbatches=rank.microbatches,
        recompute=rank.recompute,
        dtype_bytes=dtype_bytes,
    )


def expert_gradient_bytes(experts: float, *, replicas: int) -> float:
    """DP bytes of one GPU per step for the `experts` routed-expert elements it holds under EP:
    one all-reduce of their fp32 gradients over the `replicas` = dp*cp/ep GPUs holding them."""
    return all_reduce_factor(replicas) * GRAD_BYTES * experts if replicas > 1 else 0.0


def hsdp_bytes(
    params: int, *, shard_group: int, replicas: int, pipelined: bool, microbatches: int
) -> tuple[float, float]:
    """(intra-group, inter-group) DP bytes of one GPU per step under HSDP: FSDP's all-gathers
    and reduce-scatter inside a shard group, then an all-reduce of the sharded gradient across
    the replica groups (plain DDP across them when a group holds one GPU)."""
    if shard_group == 1:
        return 0.0, dp_bytes(params, dp=replicas, fsdp=False, pipelined=pipelined, microbatches=1)
    intra = dp_bytes(
        params, dp=shard_group, fsdp=True, pipelined=pipelined, microbatches=microbatches
    )
    inter = all_reduce_factor(replicas) * GRAD_BYTES * params / shard_group if replicas > 1 else 0
    return intra, inter


def dp_bytes(params: int, *, dp: int, fsdp: bool, pipelined: bool, microbatches: int) -> float:
    """DP traffic of one GPU per step for `params` elements (this rank's, before sharding).

    FSDP all-gathers the weights (once per step under pipelining, which keeps them unsharded;
    else before each microbatch's forward and backward) and reduce-scatters the gradients once;
    replication all-reduces the gradients once.
    """
    if dp == 1:
        return 0.0
    if not fsdp:
        return all_reduce_factor(dp) * GRAD_BYTES * params
    gathered = fsdp_gather_bytes(params, dp=dp, pipelined=pipelined, microbatches=microbatches)
    return gathered + gather_factor(dp) * params * GRAD_BYTES


def fsdp_gather_bytes(
    params: int, *, dp: int, pipelined: bool, microbatches: int, weight_bytes: int = WEIGHT_BYTES
) -> float:
    """FSDP2's parameter all-gathers of one GPU per step (weights in `weight_bytes`: 2 for the
    bf16 MixedPrecisionPolicy, 4 for fp32), checked against a measurement in
    tests/parallel/test_mixed_precision.py."""
    gathers = 1 if pipelined else 2 * microbatches
    return gather_factor(dp) * params * gathers * weight_bytes


def link_bytes_per_s(cluster: Cluster, group_span: int) -> float:
    """Bandwidth per GPU of a group spanning `group_span` consecutive ranks (mesh order dp, pp,
    cp, tp with tp innermost): NVLink inside a node, the network once it crosses one."""
    gbps = (
        cluster.intra_node_gbps if group_span <= cluster.gpus_per_node else cluster.inter_node_gbps
    )
    return gbps * 1e9
