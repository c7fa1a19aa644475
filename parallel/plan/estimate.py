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

from dataclasses import dataclass

from models.llama import ModelArgs
from parallel.pipeline.runtime import layers_per_stage
from parallel.plan.comm import cp_bytes, hsdp_bytes, link_bytes_per_s, pp_bytes, tp_bytes
from parallel.plan.flops import forward_flops_per_token, training_flops_per_token
from parallel.plan.layout import Cluster, Layout
from parallel.plan.memory import RUNTIME_RESERVED_BYTES, activation_bytes, state_bytes
from parallel.plan.params import StageCounter

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
    dp, pp, tp, m = layout.dp, layout.pp, layout.tp, layout.microbatches
    cp, shard = layout.cp, layout.shard_group
    pipeline = layout.pipeline
    n_stages = pipeline.n_stages
    explicit = (
        list(layout.layers_per_stage) if layout.layers_per_stage is not None and pp > 1 else None
    )
    counts = layers_per_stage(args.n_layers, n_stages, explicit)
    tokens_mb = global_batch_size // (dp * m) * seq_len // cp  # one GPU's tokens of a microbatch
    tokens_rank = tokens_mb * m  # tokens one GPU processes per step
    sp, rc = layout.sequence_parallel and tp > 1, layout.recompute
    fsdp, pipelined = shard > 1, pp > 1
    peak = cluster.peak_tflops * 1e12
    # group spans in the mesh (dp, pp, cp, tp); an HSDP shard group is dp/dp_replicate x cp
    spans = (tp, tp * cp * pp, tp * cp, tp * cp * pp * dp // layout.dp_replicate, layout.gpus)
    tp_bw, pp_bw, cp_bw, dp_bw, inter_bw = (link_bytes_per_s(cluster, s) for s in spans)
    width = args.n_heads * args.head_dim / tp  # attention's width on one TP rank
    ranks = []
    for r in range(pp):
        sids = pipeline.stage_ids(r) if pp > 1 else [0]
        stages = [counter.stage(s, counts, tp) for s in sids]
        params = sum(s.total for s in stages)
        local = sum(s.sharded(shard) for s in stages) if fsdp else params
        layers = sum(s.layers for s in stages)
        block = max(s.largest_block for s in stages)
        weights, grads, optimizer = state_bytes(
            params, local, block, fsdp=fsdp, pipelined=pipelined, microbatches=m
        )
        held = pipeline.in_flight(r)
        acts = activation_bytes(
            args,
            layers=layers,
            last_stage=n_stages - 1 in sids,
            tokens=tokens_mb,
            in_flight=held,
            tp=tp,
            sequence_parallel=sp,
            recompute=rc,
            pipelined=pipelined,
            cp=cp,
            cp_comm=layout.cp_comm,
        )
        matmul = params - sum(s.embedding for s in stages)
        model_flops = tokens_rank * training_flops_per_token(matmul, layers, width, seq_len)
        recompute_flops = (
            tokens_rank * forward_flops_per_token(layers * block, layers, width, seq_len)
            if rc == "full"
            else 0.0
        )
        ends = (0 in sids) + (n_stages - 1 in sids)
        tp_b = tp_bytes(
            args,
            tp=tp,
            sequence_parallel=sp,
            layers=layers,
            ends=ends,
            tokens=tokens_mb,
            microbatches=m,
            recompute=rc,
        )
        pp_b = (
            pp_bytes(
                args,
                tp=tp,
                sequence_parallel=sp,
                stage_ids=sids,
                n_stages=n_stages,
                tokens=tokens_mb,
                microbatches=m,
            )
            if pipelined
            else 0.0
        )
        cp_b = cp_bytes(
            args,
            tp=tp,
            cp=cp,
            comm=layout.cp_comm,
            layers=layers,
            tokens=tokens_mb,
            microbatches=m,
            recompute=rc,
        )
        intra, inter = hsdp_bytes(
            params,
            shard_group=shard,
            replicas=dp * cp // shard,
            pipelined=pipelined,
            microbatches=m,
        )
        hardware = model_flops + recompute_flops
        compute_s = hardware / (peak * MATMUL_EFFICIENCY)
        # FSDP hides its traffic behind compute: one microbatch's worth under pipelining
        dp_s = intra / dp_bw + inter / inter_bw
        dp_exposed_s = max(0.0, dp_s - compute_s / (m if pipelined else 1))
        ranks.append(
            RankEstimate(
                r,
                sids,
                layers,
                params,
                local,
                weights,
                grads,
                optimizer,
                acts,
                held,
                model_flops,
                hardware,
                tp_b,
                pp_b,
                intra + inter,
                compute_s,
                # CP's K/V exchange waits before attention (the ring's overlap is not counted)
                tp_b / tp_bw + pp_b / pp_bw + cp_b / cp_bw,
                dp_s,
                dp_exposed_s,
                cp_b,
                inter,
            )
        )
    bubble = pipeline.bubble_over_ideal
    pipeline_s = max(r.compute_s + r.comm_s for r in ranks) * (1 + bubble)
    step = pipeline_s + max(r.dp_exposed_s for r in ranks)
    flops = dp * cp * tp * sum(r.model_flops for r in ranks)
    return PlanEstimate(
        ranks,
        layout.gpus,
        cluster.gpu_mem_gib * GIB,
        bubble / (1 + bubble),
        step,
        global_batch_size * seq_len / step,
        flops / (step * peak * layout.gpus),
    )
