"""The run's first screen: what is trained, on what, how, from which data, and where it goes."""

from __future__ import annotations

from pathlib import Path

import torch

from data import TokenSource
from launcher.config import Config
from launcher.run.build import pipeline_of, pipeline_split
from launcher.run.trainer import uses_bf16
from models.args import ModelArgs
from models.registry import parameter_count
from parallel.mesh import resolve_device
from parallel.pipeline.split import SplitChoice
from parallel.plan.params import active_parameters

# torch.cpu's private probes (what Inductor uses); a torch without them counts as no bf16
BF16_CPU_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), as Inductor asks torch."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in BF16_CPU_CHECKS)


def compute_dtype(cfg: Config) -> str:
    """Where and in what the matmuls run, by the trainer's own rule (and a warning where bf16
    would run emulated)."""
    device = resolve_device(cfg.device)
    bf16 = uses_bf16(device, cfg.precision)
    line = f"{device.type}, {'bf16 autocast (fp32 weights)' if bf16 else 'fp32'}"
    if bf16 and device.type == "cpu" and not cpu_has_bf16():
        line += (
            " -- this CPU has no bf16 instructions (AVX512-BF16, AMX): bf16 runs emulated, "
            "12x slower than fp32 on an AVX2 EPYC (BENCHMARKS.md section 5); precision=fp32"
        )
    return line


def parameters_phrase(args: ModelArgs) -> str:
    """`3.2M parameters`, or for a model whose tokens go through only some of them (a MoE's
    k of E experts) `330.6M parameters (183.1M active)`, by the family's arithmetic."""
    total, active = parameter_count(args), active_parameters(args)
    phrase = f"{total / 1e6:,.1f}M parameters"
    return phrase if active == total else f"{phrase} ({active / 1e6:,.1f}M active)"


def split_line(split: SplitChoice, n_layers: int) -> str:
    """Which blocks each pipeline stage holds, and why (the cost model's choice says so)."""
    line = f"  pipeline split {split.counts} blocks per stage"
    if split.how == "explicit":
        return line + " (parallel.layers_per_stage)"
    if not split.automatic:
        return line + f" (even; estimated imbalance max/mean {split.imbalance:.2f})"
    slower = split.even_slowdown
    even = (
        f"the even split {split.even} is estimated {slower:.2f}x slower on its slowest rank"
        if slower is not None
        else f"{n_layers} blocks do not split evenly"
    )
    default = "; parallel.layers_per_stage=even keeps the even one" if split.even else ""
    how = "auto" if split.how == "auto" else "auto, the default here"
    return (
        f"{line} ({how}: chosen by the cost model, estimated imbalance max/mean "
        f"{split.imbalance:.2f}; {even}{default if split.how != 'auto' else ''})"
    )


def banner_lines(
    cfg: Config,
    tokens: TokenSource,
    run_dir: Path | None,
    checkpoint_dir: Path | str | None,  # a path or an fsspec URL
    resume: Path | str | None,
) -> list[str]:
    """A few lines for rank 0 to print before anything slow starts."""
    m, p, t, c = cfg.model, cfg.parallel, cfg.train, cfg.checkpoint
    cp = f" x cp={p.cp} ({p.cp_comm})" if p.cp > 1 else ""
    dp = f"dp={p.dp}" + (
        f" (HSDP: {p.dp_replicate} replicas x {p.dp // p.dp_replicate})"
        if p.dp_replicate > 1
        else ""
    )
    layout = f"{dp} x pp={p.pp}{cp} x tp={p.tp} ({_plural(p.world_size, 'rank')})"
    if p.ep > 1:
        layout += (
            f", ep={p.ep} over dp x cp ({m.n_experts // p.ep} of {m.n_experts} experts per rank)"
        )
    ft = cfg.fault_tolerance
    if ft.enable:  # each replica group is its own world: say which one this is
        layout += (
            f"; fault tolerant: replica group {ft.replica_id} of {p.dp_replicate} "
            f"({_plural(p.world_size // p.dp_replicate, 'rank')}), at least {ft.min_replicas} live"
        )
    if p.pp > 1:
        pipeline = pipeline_of(cfg)
        v, bubble = pipeline.stages_per_rank, pipeline.bubble_fraction
        layout += (
            f", {p.schedule} with {_plural(p.microbatches, 'microbatch')} and {v} stage(s) per "
            f"rank: bubble {bubble:.0%} of the step"
        )
    elif p.microbatches > 1:
        layout += f", {_plural(p.microbatches, 'microbatch')} accumulated"
    split = pipeline_split(cfg)
    source = cfg.data.source + (f" {cfg.data.path}" if cfg.data.path else "")
    per_step = t.global_batch_size * t.seq_len
    saves = (
        " and ".join(
            ([f"every {c.interval} steps"] if c.interval else [])
            + (["at the end"] if c.final else [])
        )
        or "only on a stop signal"
    )
    return [
        f"tridist: model {m.name}, {parameters_phrase(m)} ({m.n_layers} layers, "
        f"dim {m.dim}, vocab {m.vocab_size:,}), {compute_dtype(cfg)}",
        f"  mesh {layout}",
        *([split_line(split, m.n_layers)] if split else []),
        f"  data {source}: {len(tokens.train):,} train / {len(tokens.val):,} validation tokens; "
        f"{t.global_batch_size} x {t.seq_len} = {per_step:,} tokens per step, {_plural(t.steps, 'step')}",
        f"  run folder {run_dir if run_dir is not None else '(none: library call)'}",
        f"  checkpoints {checkpoint_dir} ({saves}, newest {c.keep} kept)"
        if checkpoint_dir
        else "  checkpoints: none",
        f"  resume from {resume}" if resume is not None else "  resume: no (a fresh run)",
    ]
