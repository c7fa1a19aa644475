"""`python -m launcher.plan [--search] [overrides]`: memory, bubble, communication and step time
of a layout before launching it, or a search for the best layouts on a cluster.

Takes the training overrides (model=llama3_405b parallel.tp=8 ...) plus the cluster
(cluster.nodes, cluster.gpus_per_node, cluster.gpu_mem_gib, bandwidths) and the GPUs' peak
(hardware.peak_tflops; unset: H100 SXM's). No GPU, no process group: parameters come from the
real split and TP plan on the meta device (parallel/plan/params.py), the rest from
parallel/plan/estimate.py, which this turns the config into explicit parts for. Exit code 2
when the config is invalid or the layout does not fit.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TextIO

from launcher.config import Config, ConfigError
from launcher.errors import print_config_error
from launcher.run.build import model_args, pipeline_split
from launcher.run.compose import check_group_choices, compose_config
from launcher.validate import validate
from parallel.pipeline.registry import SCHEDULE_SPECS
from parallel.pipeline.split import SplitChoice, imbalance
from parallel.plan.estimate import GIB, MATMUL_EFFICIENCY, PlanEstimate, RankEstimate, estimate
from parallel.plan.flops import PLAN_DEFAULT_PEAK_TFLOPS
from parallel.plan.layout import Cluster, Layout, is_moe
from parallel.plan.params import StageCounter, active_parameters

MICROBATCH_SIZES = (1, 2, 4, 8)  # sequences per microbatch tried by --search
CP_SIZES = (1, 2, 4, 8)  # context parallel sizes tried by --search (cp x tp inside a node)
RECOMPUTE_MODES = ("none", "selective", "full")
SEARCHED_VIRTUAL_STAGES = (2, 4)  # tried by --search for schedules that take any number
PROGRESS_S = 5.0  # seconds between --search progress lines


def world_of(cfg: Config) -> int:
    """GPUs in the cluster."""
    return cfg.cluster.nodes * cfg.cluster.gpus_per_node


def layout_of(cfg: Config) -> Layout:
    """The parallel layout `cfg` describes, as the planner takes it."""
    p = cfg.parallel
    split = pipeline_split(cfg)
    explicit = tuple(split.counts) if split is not None else None
    return Layout(
        dp=p.dp,
        pp=p.pp,
        tp=p.tp,
        virtual_stages=p.virtual_stages,
        schedule=p.schedule,
        microbatches=p.microbatches,
        layers_per_stage=explicit,
        sequence_parallel=p.sequence_parallel,
        dp_shard=p.dp_shard,
        recompute=cfg.model.activation_checkpointing,
        cp=p.cp,
        cp_comm=p.cp_comm,
        dp_replicate=p.dp_replicate,
        ep=p.ep,
    )


def cluster_of(cfg: Config) -> Cluster:
    """The cluster `cfg` plans for; its peak is hardware.peak_tflops, else H100 SXM's."""
    c, peak = cfg.cluster, cfg.hardware.peak_tflops
    return Cluster(
        nodes=c.nodes,
        gpus_per_node=c.gpus_per_node,
        gpu_mem_gib=c.gpu_mem_gib,
        intra_node_gbps=c.intra_node_gbps,
        inter_node_gbps=c.inter_node_gbps,
        peak_tflops=PLAN_DEFAULT_PEAK_TFLOPS if peak is None else peak,
    )


def estimate_config(cfg: Config, counter: StageCounter) -> PlanEstimate:
    """Estimate the (already validated) layout of `cfg` on its cluster."""
    return estimate(
        model_args(cfg),
        layout_of(cfg),
        cluster_of(cfg),
        global_batch_size=cfg.train.global_batch_size,
        seq_len=cfg.train.seq_len,
        counter=counter,
    )


def schedule_candidates(pp: int) -> list[tuple[str, int]]:
    """The (schedule, virtual stages) pairs --search tries: every registered schedule when
    pipelining, 1f1b alone without."""
    if pp == 1:
        return [("1f1b", 1)]
    return [
        (spec.name, v)
        for spec in SCHEDULE_SPECS.values()
        for v in (
            SEARCHED_VIRTUAL_STAGES
            if spec.stages_per_rank == "virtual_stages"
            else (spec.stages_per_rank,)
        )
    ]


def ep_candidates(cfg: Config, dp_cp: int) -> list[int]:
    """The expert parallel sizes --search tries: for a MoE model every ep dividing both dp x cp
    (the GPUs it borrows) and the number of experts; 1 alone for a dense model."""
    if not is_moe(cfg.model):
        return [1]
    return [e for e in range(1, dp_cp + 1) if dp_cp % e == 0 and cfg.model.n_experts % e == 0]


def candidates(cfg: Config) -> Iterator[Config]:
    """Every (tp, cp, pp, dp, dp_replicate, ep, v, m, schedule, recompute, sequence parallel)
    layout of the cluster that passes `validate`; tp x cp stays inside a node, dp_shard and
    cp_comm are kept from `cfg`; HSDP is tried with one replica group per node group when dp
    spans nodes; ep (MoE models only) divides dp x cp and the number of experts."""
    world, per_node = world_of(cfg), cfg.cluster.gpus_per_node
    for tp, cp in (
        (t, c) for t in range(1, per_node + 1) for c in CP_SIZES if per_node % (t * c) == 0
    ):
        for pp in (d for d in range(1, world // (tp * cp) + 1) if world // (tp * cp) % d == 0):
            dp = world // (tp * cp * pp)
            local = cfg.train.global_batch_size // dp
            # HSDP: shard inside a node's worth of ranks, replicate across those groups
            in_node = max(1, per_node // (tp * cp * pp))
            replicas = {1} | ({dp // in_node} if dp > in_node and dp % in_node == 0 else set())
            for (schedule, v), mbs, rep, ep in (
                (s, b, r, e)
                for s in schedule_candidates(pp)
                for b in MICROBATCH_SIZES
                for r in sorted(replicas)
                for e in ep_candidates(cfg, dp * cp)
            ):
                # shortcuts past validate: no split has more stages than blocks plus the two ends
                if local % mbs or local < mbs or pp * v > cfg.model.n_layers + 2:
                    continue
                for rc in RECOMPUTE_MODES:
                    for sp in (False, True) if tp > 1 else (False,):
                        par = replace(
                            cfg.parallel,
                            tp=tp,
                            cp=cp,
                            pp=pp,
                            dp=dp,
                            dp_replicate=rep if cfg.parallel.dp_shard else 1,
                            ep=ep,
                            virtual_stages=v,
                            schedule=schedule,
                            microbatches=local // mbs,
                            sequence_parallel=sp,
                            layers_per_stage=None,
                        )
                        c = replace(
                            cfg, parallel=par, model=replace(cfg.model, activation_checkpointing=rc)
                        )
                        try:
                            validate(c, world, per_node)
                        except ConfigError:
                            continue
                        yield c


def search(
    cfg: Config, top: int, progress: TextIO | None = None
) -> tuple[list[tuple[Config, PlanEstimate]], int]:
    """The `top` fitting layouts by estimated tokens/s, and how many valid layouts there were;
    with `progress`, a line there at the first estimate, every few seconds and at the last."""
    counter = StageCounter(model_args(cfg))
    layouts, plans = list(candidates(cfg)), []
    shown = time.perf_counter()
    for done, c in enumerate(layouts, 1):
        plans.append((c, estimate_config(c, counter)))
        if progress and (done in (1, len(layouts)) or time.perf_counter() - shown > PROGRESS_S):
            shown = time.perf_counter()
            print(
                f"search: estimated {done:,} of {plural(len(layouts), 'valid layout')}",
                file=progress,
            )
    fitting = sorted(
        (p for p in plans if p[1].fits), key=lambda p: (-p[1].tokens_per_s, -p[1].headroom)
    )
    return fitting[:top], len(plans)


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 microbatch`, `4 microbatches`: the count and the word in the form it takes."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def describe(cfg: Config) -> str:
    """The layout in one line."""
    p, t = cfg.parallel, cfg.train
    mbs = t.global_batch_size // (p.dp * p.microbatches)
    cp = f"cp={p.cp} ({p.cp_comm}) x " if p.cp > 1 else ""
    hsdp = f" (HSDP: {p.dp_replicate} replica groups)" if p.dp_replicate > 1 else ""
    ep = f", ep={p.ep} over dp x cp" if p.ep > 1 else ""
    return (
        f"tp={p.tp} x {cp}pp={p.pp} x dp={p.dp}{hsdp} ({plural(p.world_size, 'GPU')}){ep}, {p.schedule} "
        f"v={p.virtual_stages}, {plural(p.microbatches, 'microbatch', 'microbatches')} of "
        f"{plural(mbs, 'sequence')} x {t.seq_len} tokens, recompute "
        f"{cfg.model.activation_checkpointing}, {'FSDP' if p.dp_shard else 'replicated'} over dp"
        f"{' x cp' if p.cp > 1 else ''}"
        f"{', sequence parallel' if p.sequence_parallel else ''}"
    )


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _dp_overlap(r: RankEstimate) -> str:
    """The DP traffic time of pp rank `r`: what compute hides of it and what it leaves exposed."""
    if not r.dp_exposed_s:
        return f"DP: {r.dp_s:.3g} s of traffic per step, all hidden behind compute"
    return (
        f"DP: {r.dp_s:.3g} s of traffic per step (pp rank {r.pp_rank}), "
        f"{r.dp_s - r.dp_exposed_s:.3g} s of it hidden behind compute, {r.dp_exposed_s:.3g} s exposed"
    )


def split_lines(cfg: Config, split: SplitChoice) -> list[str]:
    """The pipeline split: blocks and estimated compute time per stage, and its imbalance
    against the even split's (parallel/pipeline/split.py's cost model)."""
    p, t = cfg.parallel, cfg.train
    # FLOPs per token -> seconds per step on one GPU: the tokens of one dp rank, split over tp
    scale = t.global_batch_size // p.dp * t.seq_len / (p.tp * cluster_of(cfg).peak_tflops * 1e12)
    scale /= MATMUL_EFFICIENCY
    times = ", ".join(f"{f * scale:.3g}" for f in split.stage_flops)
    lines = [
        f"split ({split.how}): {split.counts} blocks per stage; estimated compute per stage "
        f"[{times}] s; imbalance max/mean over pp ranks {split.imbalance:.3f}"
    ]
    if split.even is not None and split.even_rank_flops is not None and split.even != split.counts:
        lines.append(
            f"    (the even split {split.even}: imbalance {imbalance(split.even_rank_flops):.3f}, "
            f"its slowest rank estimated {split.even_slowdown:.3f}x this split's)"
        )
    return lines


def parameters_phrase(cfg: Config, counter: StageCounter) -> str:
    """`8.03B parameters`, or for a MoE model `30.53B parameters, 3.35B active`: the meta
    device's count, and the active ones by the family's arithmetic."""
    total = f"{_count(counter.whole().total)} parameters"
    return f"{total}, {_count(active_parameters(cfg.model))} active" if is_moe(cfg.model) else total


def expert_lines(cfg: Config, plan: PlanEstimate) -> list[str]:
    """For a MoE model: the experts each GPU holds, and what expert parallelism sends."""
    if not is_moe(cfg.model):
        return []
    p, gb, m, w = cfg.parallel, 1e9, cfg.model, plan.worst
    slow = max(plan.ranks, key=lambda r: r.ep_bytes)
    held = (
        f"{m.n_experts // p.ep} of {m.n_experts} routed experts per GPU (ep={p.ep}, not "
        f"FSDP-sharded)"
        if p.ep > 1
        else f"all {m.n_experts} routed experts on every GPU (ep=1, FSDP-sharded as the rest)"
    )
    line = f"experts: {held}; {_count(w.experts)} of params/GPU on pp rank {w.pp_rank}"
    if p.ep == 1:
        return [line]
    replicas = p.dp * p.cp // p.ep
    gradients = (
        f"their gradients all-reduced over {plural(replicas, 'GPU')}: "
        f"{slow.expert_dp_bytes / gb:.2f} GB, counted in DP"
        if replicas > 1
        else "no gradient all-reduce (ep = dp x cp)"
    )
    return [
        line,
        f"    EP all-to-all per GPU per step (pp rank {slow.pp_rank}): {slow.ep_bytes / gb:.2f} GB "
        f"(dispatch and combine, forward and backward: {m.experts_per_token} rows of {m.dim} per "
        f"token, (ep-1)/ep of them sent); {gradients}",
    ]


def report(cfg: Config, plan: PlanEstimate, counter: StageCounter) -> str:
    """The per-pipeline-rank table and the totals, as printed."""
    c, p = cluster_of(cfg), cfg.parallel
    source = (
        "hardware.peak_tflops"
        if cfg.hardware.peak_tflops is not None
        else "H100 SXM's by default; set hardware.peak_tflops"
    )
    lines = [
        f"plan: {cfg.model.name} ({parameters_phrase(cfg, counter)}) on {plural(c.nodes, 'node')} x "
        f"{plural(c.gpus_per_node, 'GPU')} ({c.gpu_mem_gib:g} GiB, {c.peak_tflops:g} TFLOP/s "
        f"({source}), intra-node {c.intra_node_gbps:g} GB/s, inter-node {c.inter_node_gbps:g} GB/s)",
        f"layout: {describe(cfg)}",
        f"{'pp':>3} {'stages':>8} {'layers':>6} {'params/GPU':>10} {'sharded':>9} {'weights':>8} "
        f"{'grads':>6} {'optim':>6} {'activ':>6} {'in flight':>9} {'total GiB':>9}",
    ]
    for r in plan.ranks:
        lines.append(
            f"{r.pp_rank:>3} {','.join(map(str, r.stage_ids)):>8} {r.layers:>6} {_count(r.params):>10} "
            f"{_count(r.params_local):>9} {_gib(r.weights):>8} {_gib(r.grads):>6} {_gib(r.optimizer):>6} "
            f"{_gib(r.activations):>6} {r.in_flight:>9.2f} {_gib(r.total):>9}"
        )
    lines.append(
        "    (pp: pipeline rank; stages: the chunks it runs; params/GPU: before FSDP sharding, "
        "sharded: after; weights..activ: GiB; in flight: microbatches whose activations it "
        "holds at its peak; total: with 3 GiB runtime reserve)"
    )
    lines += expert_lines(cfg, plan)
    split = pipeline_split(cfg)
    lines += split_lines(cfg, split) if split is not None else []
    slow = max(plan.ranks, key=lambda r: r.compute_s + r.comm_s)
    dp_rank = max(plan.ranks, key=lambda r: (r.dp_exposed_s, r.dp_s))
    stretched = ", stretched by the bubble" if p.pp > 1 else ""
    gb = 1e9
    lines += [
        f"bubble: {plan.bubble:.1%} of the step, {plan.bubble / (1 - plan.bubble):.1%} of the ideal "
        f"compute time ({p.schedule}, p={p.pp}, m={p.microbatches})",
        f"communication per GPU per step (pp rank {slow.pp_rank}): TP {slow.tp_bytes / gb:.2f} GB, "
        f"PP {slow.pp_bytes / gb:.2f} GB, "
        + (f"CP {slow.cp_bytes / gb:.2f} GB ({p.cp_comm}), " if p.cp > 1 else "")
        + (f"EP {slow.ep_bytes / gb:.2f} GB (all-to-all), " if p.ep > 1 else "")
        + f"DP {slow.dp_bytes / gb:.2f} GB"
        + (
            f" ({(slow.dp_bytes - slow.dp_inter_bytes - slow.expert_dp_bytes) / gb:.2f} GB inside "
            "replica groups, "
            f"{slow.dp_inter_bytes / gb:.2f} GB across them"
            + (f", {slow.expert_dp_bytes / gb:.2f} GB the experts'" if p.ep > 1 else "")
            + ")"
            if p.dp_replicate > 1
            else ""
        ),
        f"step: {plan.step_s:.3g} s = {plan.step_s - dp_rank.dp_exposed_s:.3g} s on pp rank "
        f"{slow.pp_rank} (compute {slow.compute_s:.3g} s + TP+PP{'+CP' if p.cp > 1 else ''}"
        f"{'+EP' if p.ep > 1 else ''} {slow.comm_s:.3g} s{stretched}) + "
        f"{dp_rank.dp_exposed_s:.3g} s exposed DP; {plan.tokens_per_s:,.0f} tokens/s; MFU {plan.mfu:.1%}",
        _dp_overlap(dp_rank),
    ]
    w = plan.worst
    if plan.fits:
        lines.append(
            f"fits: pp rank {w.pp_rank} is the fullest at {_gib(w.total)} GiB of "
            f"{_gib(plan.gpu_bytes)} GiB ({_gib(plan.headroom)} GiB headroom)"
        )
    else:
        lines.append(
            f"does not fit: pp rank {w.pp_rank} needs {_gib(w.total)} GiB of {_gib(plan.gpu_bytes)} GiB "
            f"(short by {_gib(-plan.headroom)} GiB)"
        )
    return "\n".join(lines)


def search_report(
    cfg: Config, rows: list[tuple[Config, PlanEstimate]], valid: int, seconds: float
) -> str:
    """The ranked layouts, as printed, with what the columns mean (an ep column for a MoE)."""
    c, moe = cfg.cluster, is_moe(cfg.model)
    ep_column = f"{'ep':>3} " if moe else ""
    lines = [
        f"search: {cfg.model.name} on {plural(c.nodes, 'node')} x {plural(c.gpus_per_node, 'GPU')} "
        f"({c.gpu_mem_gib:g} GiB), global batch {plural(cfg.train.global_batch_size, 'sequence')} "
        f"x {cfg.train.seq_len} tokens: {plural(valid, 'valid layout')}, top {len(rows)} that fit "
        f"by estimated tokens/s ({seconds:.1f} s)",
        f"{'#':>3} {'tp':>3} {'cp':>3} {'pp':>3} {'dp':>5} {'rep':>3} {ep_column}"
        f"{'schedule':>16} {'v':>2} {'m':>4} {'mbs':>3} {'recompute':>9} "
        f"{'sp':>3} {'GiB':>6} {'headroom':>8} {'bubble':>6} {'step s':>7} {'tokens/s':>11} {'MFU':>6}",
    ]
    for i, (c2, p) in enumerate(rows, 1):
        q = c2.parallel
        mbs = c2.train.global_batch_size // (q.dp * q.microbatches)
        lines.append(
            f"{i:>3} {q.tp:>3} {q.cp:>3} {q.pp:>3} {q.dp:>5} {q.dp_replicate:>3} "
            f"{f'{q.ep:>3} ' if moe else ''}{q.schedule:>16} "
            f"{q.virtual_stages:>2} {q.microbatches:>4} {mbs:>3} {c2.model.activation_checkpointing:>9} "
            f"{'y' if q.sequence_parallel else 'n':>3} {_gib(p.worst.total):>6} {_gib(p.headroom):>8} "
            f"{p.bubble:>6.1%} {p.step_s:>7.3g} {p.tokens_per_s:>11,.0f} {p.mfu:>6.1%}"
        )
    if not rows:
        lines.append("no layout fits: use more GPUs, a smaller global batch or a shorter sequence")
        return "\n".join(lines)
    lines.append(
        "    (cp: context parallel; rep: HSDP replica groups of dp; "
        + ("ep: expert parallel, over dp x cp; " if moe else "")
        + "v: stages per pipeline rank; "
        "m: microbatches per step; mbs: sequences per "
        "microbatch; sp: sequence parallelism; GiB: the fullest GPU's peak; bubble: of the step)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: invalid config, or the layout does not fit)."""
    parser = argparse.ArgumentParser(
        prog="python -m launcher.plan", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--search", action="store_true", help="rank the valid layouts of the cluster"
    )
    parser.add_argument("--top", type=int, default=10, help="layouts --search prints")
    args, overrides = parser.parse_known_args(argv)
    try:
        check_group_choices(overrides)
        cfg = compose_config(overrides)
        if args.search:
            start = time.perf_counter()
            rows, valid = search(cfg, args.top, progress=sys.stderr)
            print(search_report(cfg, rows, valid, time.perf_counter() - start))
            return 0 if rows else 2
        validate(cfg, world_of(cfg), cfg.cluster.gpus_per_node)
    except ConfigError as err:
        return print_config_error(err)
    counter = StageCounter(model_args(cfg))
    plan = estimate_config(cfg, counter)
    print(report(cfg, plan, counter))
    return 0 if plan.fits else 2


if __name__ == "__main__":
    sys.exit(main())
