"""Estimate a layout without a GPU: per pipeline rank parameters, memory, communication, time.

Step time is a simple roofline. Each pipeline rank computes its FLOPs at MATMUL_EFFICIENCY of
peak; TP and PP traffic sit on the critical path (a TP collective separates two matmuls; a
stage waits for its input); the pipeline then stretches the slowest rank by the schedule's
bubble (parallel/pipeline/registry.py); DP traffic overlaps with compute except what outlasts the window
FSDP can hide it in (one microbatch under pipelining, the whole step otherwise).
FLOPs per token are parallel/plan/flops.py's (PaLM's, as MFU counts them) for the layers and
matmul parameters a GPU holds; recompute adds one forward of the blocks to the hardware FLOPs only.
A Mixture-of-Experts model counts the parameters a token goes through (its k routed experts of
E, the load taken as balanced across experts and EP ranks); TP leaves its MoE feed-forwards
whole, so every TP rank computes them: hardware FLOPs count that, model FLOPs once per TP group.
Expert parallelism splits the routed experts' state over ep GPUs (not FSDP-sharded; their
gradients all-reduced over dp*cp/ep, overlapped as DP is); its all-to-alls wait on the critical
path as TP's collectives do.
Activations are held for the schedule's microbatches in flight (`microbatches_in_flight`,
parallel/pipeline/registry.py), which torch's runtime was measured to meet.
Takes explicit parts (a ModelArgs, a Layout, a Cluster), never a launcher config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from models.args import ModelArgs
from parallel.pipeline.runtime import layers_per_stage
from parallel.plan.comm import (
    cp_bytes,
    ep_bytes,
    expert_gradient_bytes,
    hsdp_bytes,
    link_bytes_per_s,
    pp_bytes,
    tp_bytes,
)
from parallel.plan.flops import forward_flops_per_token, training_flops_per_token
from parallel.plan.layout import Cluster, Layout, RankContext
from parallel.plan.memory import RUNTIME_RESERVED_BYTES, activation_bytes, state_bytes
from parallel.plan.params import StageCounter, StageParams, active_expert_share

MATMUL_EFFICIENCY = 0.7  # share of peak dense bf16 FLOP/s large GEMMs sustain on current GPUs
GIB = 2**30


@dataclass
class RankEstimate:
    """One pipeline rank (any of its tp x dp GPUs): what it holds, sends and computes."""

    pp_rank: int
    stage_ids: list[int]
    layers: int
    params: int  # elements on one GPU before FSDP sharding
    params_local: int  # after it
    weights: float  # bytes
    grads: float
    optimizer: float
    activations: float
    in_flight: float  # microbatches whose activations it holds at its peak (as torch holds them)
    model_flops: float  # per step
    hardware_flops: float  # with recompute
    tp_bytes: float
    pp_bytes: float
    dp_bytes: float  # intra + inter
    compute_s: float
    comm_s: float  # exposed TP + PP + CP time
    dp_s: float  # DP traffic time, before overlap
    dp_exposed_s: float  # the part of it compute does not hide
    cp_bytes: float = 0.0  # K/V traffic of context parallelism
    dp_inter_bytes: float = 0.0  # of dp_bytes: HSDP's all-reduce across replica groups
    experts: int = 0  # of params: the routed experts' elements on this GPU (1/ep of them)
    ep_bytes: float = 0.0  # expert parallelism's all-to-alls (dispatch and combine)
    expert_dp_bytes: float = 0.0  # of dp_bytes: the all-reduce of the EP-split experts' gradients

    @property
    def total(self) -> float:
        """Peak bytes on one GPU of this rank, runtime reserve included."""
        return (
            self.weights + self.grads + self.optimizer + self.activations + RUNTIME_RESERVED_BYTES
        )


@dataclass
class PlanEstimate:
    """A whole layout: its ranks, bubble, step time, throughput and whether it fits."""

    ranks: list[RankEstimate]
    gpus: int
    gpu_bytes: float
    bubble: float  # fraction of the step
    step_s: float
    tokens_per_s: float
    mfu: float

    @property
    def worst(self) -> RankEstimate:
        """The pipeline rank that needs the most memory."""
        return max(self.ranks, key=lambda r: r.total)

    @property
    def headroom(self) -> float:
        """Bytes left on the fullest GPU (negative: short by that much)."""
        return self.gpu_bytes - self.worst.total

    @property
    def fits(self) -> bool:
        """True if every GPU has room."""
        return self.headroom >= 0


@dataclass(frozen=True)
class _Links:
    """Bytes per second of each group a GPU of the layout talks in."""

    tp: float
    pp: float
    cp: float
    dp: float  # inside an (HSDP) shard group
    inter: float  # across replica groups
    ep: float  # the all-to-all group of expert parallelism
    experts: float  # the group of GPUs holding the same experts under EP


def _links(layout: Layout, cluster: Cluster) -> _Links:
    """Link speed per group from its span in the mesh (dp, pp, cp, tp); an HSDP shard group
    spans dp/dp_replicate x cp; an EP group, TorchTitan's, all of cp and the innermost ep/cp of
    dp (inside cp when ep <= cp); the GPUs holding the same experts, the rest of dp."""
    tp, cp, pp, dp, ep = layout.tp, layout.cp, layout.pp, layout.dp, layout.ep
    ep_span = tp * ep if ep <= cp else tp * cp * pp * (ep // cp)
    spans = (
        tp,
        tp * cp * pp,
        tp * cp,
        tp * cp * pp * dp // layout.dp_replicate,
        layout.gpus,
        ep_span,
        layout.gpus,
    )
    return _Links(*(link_bytes_per_s(cluster, s) for s in spans))


def _rank_contexts(
    args: ModelArgs, layout: Layout, global_batch_size: int, seq_len: int
) -> list[RankContext]:
    """Per pipeline rank, what its cost formulas read."""
    pipeline = layout.pipeline
    tokens = global_batch_size // (layout.dp * layout.microbatches) * seq_len // layout.cp
    base = RankContext(
        args=args,
        tokens=tokens,
        microbatches=layout.microbatches,
        n_stages=pipeline.n_stages,
        tp=layout.tp,
        sequence_parallel=layout.sequence_parallel and layout.tp > 1,
        cp=layout.cp,
        cp_comm=layout.cp_comm,
        recompute=layout.recompute,
        ep=layout.ep,
    )
    return [
        replace(base, stage_ids=tuple(pipeline.stage_ids(r)) if layout.pp > 1 else (0,))
        for r in range(layout.pp)
    ]


def _flops(
    rank: RankContext, stages: list[StageParams], seq_len: int, share: float
) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs with recompute) of one GPU of the rank per step; `share`:
    of the routed experts' parameters, those a token goes through (active_expert_share)."""
    args, tokens = rank.args, rank.tokens * rank.microbatches
    width = args.n_heads * args.head_dim / rank.tp  # attention's width on one TP rank
    matmul = sum(s.active(share) - s.embedding for s in stages)
    # the MoE feed-forwards TP leaves whole: every TP rank of the group repeats their work
    whole = sum(s.replicated_moe + share * s.replicated_experts for s in stages)
    repeated = whole * (1 - 1 / rank.tp)
    model = tokens * training_flops_per_token(matmul - repeated, rank.layers, width, seq_len)
    hardware = tokens * training_flops_per_token(matmul, rank.layers, width, seq_len)
    if rank.recompute == "selective":
        # the routed experts' grouped matmuls are not among the ops selective recompute keeps
        experts = share * sum(s.experts for s in stages)
        return model, hardware + tokens * forward_flops_per_token(experts, 0, width, seq_len)
    if rank.recompute != "full":
        return model, hardware
    largest = max(stages, key=lambda s: s.largest_block)
    block = largest.largest_block - (1 - share) * largest.block_experts
    rebuilt = tokens * forward_flops_per_token(rank.layers * block, rank.layers, width, seq_len)
    return model, hardware + rebuilt


def _model_state(
    stages: list[StageParams], layout: Layout, rank: RankContext
) -> tuple[int, int, int, tuple[float, float, float]]:
    """(elements before FSDP sharding, after it, of them the routed experts, and (weights,
    grads, optimizer) bytes) of one GPU of the rank.
    Under EP the routed experts are split over ep GPUs and not FSDP-sharded."""
    shard, m, pipelined = layout.shard_group, rank.microbatches, rank.pipelined
    experts = sum(s.experts for s in stages)
    largest = max(stages, key=lambda s: s.largest_block)
    if rank.ep == 1 or not experts:  # the experts are parameters like any other
        params = sum(s.total for s in stages)
        local = sum(s.sharded(shard) for s in stages) if shard > 1 else params
        state = state_bytes(
            params,
            local,
            largest.largest_block,
            fsdp=shard > 1,
            pipelined=pipelined,
            microbatches=m,
        )
        return params, local, experts, state
    # FSDP over the rest (its working set: the largest block without its experts)
    rest = sum(s.total - s.experts for s in stages)
    rest_local = sum(s.sharded(shard, experts=False) for s in stages) if shard > 1 else rest
    block = largest.largest_block - largest.block_experts
    w, g, o = state_bytes(
        rest, rest_local, block, fsdp=shard > 1, pipelined=pipelined, microbatches=m
    )
    held = sum(s.experts_held(rank.ep) for s in stages)
    ew, eg, eo = state_bytes(held, held, 0, fsdp=False, pipelined=pipelined, microbatches=m)
    return rest + held, rest_local + held, held, (w + ew, g + eg, o + eo)


def _estimate_rank(
    pp_rank: int,
    rank: RankContext,
    layout: Layout,
    cluster: Cluster,
    links: _Links,
    counter: StageCounter,
    counts: list[int],
    seq_len: int,
    share: float,
) -> RankEstimate:
    """One pipeline rank: its parameters and memory, its traffic and its time."""
    shard, m, pipelined = layout.shard_group, rank.microbatches, rank.pipelined
    stages = [counter.stage(s, counts, rank.tp) for s in rank.stage_ids]
    rank = replace(rank, layers=sum(s.layers for s in stages))
    params, local, experts, (weights, grads, optimizer) = _model_state(stages, layout, rank)
    held = layout.pipeline.in_flight(pp_rank)
    model_flops, hardware = _flops(rank, stages, seq_len, share)
    tp_b, pp_b, cp_b, ep_b = tp_bytes(rank), pp_bytes(rank), cp_bytes(rank), ep_bytes(rank)
    split = experts if rank.ep > 1 else 0  # the experts EP holds apart from FSDP
    intra, inter = hsdp_bytes(
        params - split,
        shard_group=shard,
        replicas=layout.dp * layout.cp // shard,
        pipelined=pipelined,
        microbatches=m,
    )
    expert_dp = expert_gradient_bytes(split, replicas=layout.dp * layout.cp // rank.ep)
    compute_s = hardware / (cluster.peak_tflops * 1e12 * MATMUL_EFFICIENCY)
    # FSDP hides its traffic behind compute: one microbatch's worth under pipelining
    dp_s = intra / links.dp + inter / links.inter + expert_dp / links.experts
    return RankEstimate(
        pp_rank=pp_rank,
        stage_ids=list(rank.stage_ids),
        layers=rank.layers,
        params=params,
        params_local=local,
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        activations=activation_bytes(rank, held),
        in_flight=held,
        model_flops=model_flops,
        hardware_flops=hardware,
        tp_bytes=tp_b,
        pp_bytes=pp_b,
        dp_bytes=intra + inter + expert_dp,
        compute_s=compute_s,
        # CP's K/V exchange waits before attention (the ring's overlap is not counted); the
        # experts wait for EP's dispatch, the block's output for its combine
        comm_s=tp_b / links.tp + pp_b / links.pp + cp_b / links.cp + ep_b / links.ep,
        dp_s=dp_s,
        dp_exposed_s=max(0.0, dp_s - compute_s / (m if pipelined else 1)),
        cp_bytes=cp_b,
        dp_inter_bytes=inter,
        experts=experts,
        ep_bytes=ep_b,
        expert_dp_bytes=expert_dp,
    )


def estimate(
    args: ModelArgs,
    layout: Layout,
    cluster: Cluster,
    *,
    global_batch_size: int,
    seq_len: int,
    counter: StageCounter,
) -> PlanEstimate:
    """Estimate `layout` (already validated) of the model `args` on `cluster`, for steps of
    `global_batch_size` sequences of `seq_len` tokens; `counter` counts `args`' parameters."""
    pipeline, links = layout.pipeline, _links(layout, cluster)
    given = layout.layers_per_stage
    explicit = list(given) if given is not None and layout.pp > 1 else None
    counts = layers_per_stage(args.n_layers, pipeline.n_stages, explicit)
    share = active_expert_share(args)
    ranks = [
        _estimate_rank(r, rank, layout, cluster, links, counter, counts, seq_len, share)
        for r, rank in enumerate(_rank_contexts(args, layout, global_batch_size, seq_len))
    ]
    bubble = pipeline.bubble_over_ideal
    pipeline_s = max(r.compute_s + r.comm_s for r in ranks) * (1 + bubble)
    step = pipeline_s + max(r.dp_exposed_s for r in ranks)
    flops = layout.dp * layout.cp * layout.tp * sum(r.model_flops for r in ranks)
    return PlanEstimate(
        ranks=ranks,
        gpus=layout.gpus,
        gpu_bytes=cluster.gpu_mem_gib * GIB,
        bubble=bubble / (1 + bubble),
        step_s=step,
        tokens_per_s=global_batch_size * seq_len / step,
        mfu=flops / (step * cluster.peak_tflops * 1e12 * layout.gpus),
    )
