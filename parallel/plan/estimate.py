"""Estimate a layout without a GPU: per pipeline rank parameters, memory, communication, time.

Step time is a simple roofline. Each pipeline rank computes its FLOPs at MATMUL_EFFICIENCY of
peak; TP and PP traffic sit on the critical path (a TP collective separates two matmuls; a
stage waits for its input); the pipeline then stretches the slowest rank by the schedule's
bubble (parallel/schedules.py); DP traffic overlaps with compute except what outlasts the window
FSDP can hide it in (one microbatch under pipelining, the whole step otherwise).
FLOPs per token (PaLM's convention, used for MFU): 6 per matmul parameter plus 12 s h per
layer for attention; recompute adds one forward of the blocks to the hardware FLOPs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from parallel.parallelize import n_pipeline_stages
from parallel.pipeline import V_SHAPE_SCHEDULES, layers_per_stage, stage_ids_for_rank
from parallel.plan.comm import dp_bytes, link_bytes_per_s, pp_bytes, tp_bytes
from parallel.plan.memory import (
    RUNTIME_RESERVED_BYTES,
    activation_bytes,
    microbatches_in_flight,
    state_bytes,
)
from parallel.plan.params import StageCounter
from parallel.schedules import bubble_over_ideal

if TYPE_CHECKING:
    from launcher.config import Config

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
    in_flight: float  # microbatches whose activations it holds at its peak
    model_flops: float  # per step
    hardware_flops: float  # with recompute
    tp_bytes: float
    pp_bytes: float
    dp_bytes: float
    compute_s: float
    comm_s: float  # exposed TP + PP time
    dp_s: float

    @property
    def total(self) -> float:
        """Peak bytes on one GPU of this rank, runtime reserve included."""
        return self.weights + self.grads + self.optimizer + self.activations + RUNTIME_RESERVED_BYTES


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


def estimate(cfg: Config, counter: StageCounter) -> PlanEstimate:
    """Estimate the (already validated) layout of `cfg` on `cfg.cluster`."""
    m_args, par, t, cluster = cfg.model, cfg.parallel, cfg.train, cfg.cluster
    dp, pp, tp, m = par.dp, par.pp, par.tp, par.microbatches
    v = 2 if par.schedule in V_SHAPE_SCHEDULES else par.virtual_stages
    n_stages = n_pipeline_stages(pp, par.virtual_stages, par.schedule) if pp > 1 else 1
    counts = layers_per_stage(m_args.n_layers, n_stages, par.layers_per_stage if pp > 1 else None)
    tokens_mb = t.global_batch_size // (dp * m) * t.seq_len  # tokens of one microbatch
    tokens_rank = tokens_mb * m  # tokens one dp rank processes per step
    sp, rc, fsdp, pipelined = par.sequence_parallel and tp > 1, m_args.activation_checkpointing, par.dp_shard and dp > 1, pp > 1
    peak = cluster.peak_tflops * 1e12
    tp_bw, pp_bw, dp_bw = (link_bytes_per_s(cluster, span) for span in (tp, tp * pp, tp * pp * dp))
    attention = 12 * t.seq_len * m_args.dim / tp  # attention FLOPs per token per layer, one TP rank
    ranks = []
    for r in range(pp):
        sids = stage_ids_for_rank(r, pp, v, par.schedule) if pp > 1 else [0]
        stages = [counter.stage(s, counts, tp) for s in sids]
        params = sum(s.total for s in stages)
        local = sum(s.sharded(dp) for s in stages) if fsdp else params
        layers = sum(s.layers for s in stages)
        block = max(s.largest_block for s in stages)
        weights, grads, optimizer = state_bytes(params, local, block, fsdp=fsdp, pipelined=pipelined,
                                                microbatches=m)
        held = microbatches_in_flight(par.schedule, pp, r, m, v)
        acts = activation_bytes(m_args, layers=layers, last_stage=n_stages - 1 in sids, tokens=tokens_mb,
                                in_flight=held, tp=tp, sequence_parallel=sp, recompute=rc, pipelined=pipelined)
        matmul = params - sum(s.embedding for s in stages)
        model_flops = tokens_rank * (6 * matmul + attention * layers)
        recompute_flops = tokens_rank * layers * (2 * block + attention / 3) if rc == "full" else 0.0
        ends = (0 in sids) + (n_stages - 1 in sids)
        tp_b = tp_bytes(m_args, tp=tp, sequence_parallel=sp, layers=layers, ends=ends, tokens=tokens_mb,
                        microbatches=m, recompute=rc)
        pp_b = pp_bytes(m_args, tp=tp, sequence_parallel=sp, stage_ids=sids, n_stages=n_stages,
                        tokens=tokens_mb, microbatches=m) if pipelined else 0.0
        dp_b = dp_bytes(params, dp=dp, fsdp=fsdp, pipelined=pipelined, microbatches=m)
        hardware = model_flops + recompute_flops
        ranks.append(RankEstimate(
            r, sids, layers, params, local, weights, grads, optimizer, acts, held, model_flops, hardware,
            tp_b, pp_b, dp_b, hardware / (peak * MATMUL_EFFICIENCY), tp_b / tp_bw + pp_b / pp_bw, dp_b / dp_bw))
    bubble = bubble_over_ideal(par.schedule, pp, m, v)
    pipeline_s = max(r.compute_s + r.comm_s for r in ranks) * (1 + bubble)
    # FSDP hides its traffic behind compute: one microbatch's worth under pipelining
    dp_exposed = max(max(0.0, r.dp_s - r.compute_s / (m if pipelined else 1)) for r in ranks)
    step = pipeline_s + dp_exposed
    gpus = dp * pp * tp
    flops = dp * tp * sum(r.model_flops for r in ranks)
    return PlanEstimate(ranks, gpus, cluster.gpu_mem_gib * GIB, bubble / (1 + bubble), step,
                        t.global_batch_size * t.seq_len / step, flops / (step * peak * gpus))
