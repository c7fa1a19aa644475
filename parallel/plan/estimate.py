"""Estimate a layout without a GPU: per pipeline rank parameters, memory, communication, time.

Step time is a simple roofline. Each pipeline rank computes its FLOPs at MATMUL_EFFICIENCY of
peak; TP and PP traffic sit on the critical path (a TP collective separates two matmuls; a
stage waits for its input); the pipeline then stretches the slowest rank by the schedule's
bubble (parallel/pipeline/registry.py); DP traffic overlaps with compute except what outlasts the window
FSDP can hide it in (one microbatch under pipelining, the whole step otherwise).
FLOPs per token are parallel/plan/flops.py's (PaLM's, as MFU counts them) for the layers and
matmul parameters a GPU holds; recompute adds one forward of the blocks to the hardware FLOPs only.
Activations are held for the schedule's microbatches in flight (`microbatches_in_flight`,
parallel/pipeline/registry.py), which torch's runtime was measured to meet.
Takes explicit parts (a ModelArgs, a Layout, a Cluster), never a launcher config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from models.args import ModelArgs
from parallel.pipeline.runtime import layers_per_stage
from parallel.plan.comm import cp_bytes, hsdp_bytes, link_bytes_per_s, pp_bytes, tp_bytes
from parallel.plan.flops import forward_flops_per_token, training_flops_per_token
from parallel.plan.layout import Cluster, Layout, RankContext
from parallel.plan.memory import RUNTIME_RESERVED_BYTES, activation_bytes, state_bytes
from parallel.plan.params import StageCounter, StageParams

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


def _links(layout: Layout, cluster: Cluster) -> _Links:
    """Link speed per group from its span in the mesh (dp, pp, cp, tp); an HSDP shard group
    spans dp/dp_replicate x cp."""
    tp, cp, pp, dp = layout.tp, layout.cp, layout.pp, layout.dp
    spans = (tp, tp * cp * pp, tp * cp, tp * cp * pp * dp // layout.dp_replicate, layout.gpus)
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
    )
    return [
        replace(base, stage_ids=tuple(pipeline.stage_ids(r)) if layout.pp > 1 else (0,))
        for r in range(layout.pp)
    ]


def _flops(rank: RankContext, stages: list[StageParams], seq_len: int) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs with recompute) of one GPU of the rank per step."""
    args, tokens = rank.args, rank.tokens * rank.microbatches
    width = args.n_heads * args.head_dim / rank.tp  # attention's width on one TP rank
    matmul = sum(s.total - s.embedding for s in stages)
    model = tokens * training_flops_per_token(matmul, rank.layers, width, seq_len)
    if rank.recompute != "full":
        return model, model
    block = max(s.largest_block for s in stages)
    rebuilt = tokens * forward_flops_per_token(rank.layers * block, rank.layers, width, seq_len)
    return model, model + rebuilt


def _estimate_rank(
    pp_rank: int,
    rank: RankContext,
    layout: Layout,
    cluster: Cluster,
    links: _Links,
    counter: StageCounter,
    counts: list[int],
    seq_len: int,
) -> RankEstimate:
    """One pipeline rank: its parameters and memory, its traffic and its time."""
    shard, m, pipelined = layout.shard_group, rank.microbatches, rank.pipelined
    stages = [counter.stage(s, counts, rank.tp) for s in rank.stage_ids]
    params = sum(s.total for s in stages)
    local = sum(s.sharded(shard) for s in stages) if shard > 1 else params
    rank = replace(rank, layers=sum(s.layers for s in stages))
    block = max(s.largest_block for s in stages)
    weights, grads, optimizer = state_bytes(
        params, local, block, fsdp=shard > 1, pipelined=pipelined, microbatches=m
    )
    held = layout.pipeline.in_flight(pp_rank)
    model_flops, hardware = _flops(rank, stages, seq_len)
    tp_b, pp_b, cp_b = tp_bytes(rank), pp_bytes(rank), cp_bytes(rank)
    intra, inter = hsdp_bytes(
        params,
        shard_group=shard,
        replicas=layout.dp * layout.cp // shard,
        pipelined=pipelined,
        microbatches=m,
    )
    compute_s = hardware / (cluster.peak_tflops * 1e12 * MATMUL_EFFICIENCY)
    # FSDP hides its traffic behind compute: one microbatch's worth under pipelining
    dp_s = intra / links.dp + inter / links.inter
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
        dp_bytes=intra + inter,
        compute_s=compute_s,
        # CP's K/V exchange waits before attention (the ring's overlap is not counted)
        comm_s=tp_b / links.tp + pp_b / links.pp + cp_b / links.cp,
        dp_s=dp_s,
        dp_exposed_s=max(0.0, dp_s - compute_s / (m if pipelined else 1)),
        cp_bytes=cp_b,
        dp_inter_bytes=inter,
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
    ranks = [
        _estimate_rank(r, rank, layout, cluster, links, counter, counts, seq_len)
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
