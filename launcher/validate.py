"""Validation of a typed Config before any process group starts: every value that cannot work
is a ConfigError naming the field, the value and a fix."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch

from data.blend import parse_blend
from data.build import SOURCES
from launcher.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)
from launcher.run.fault_tolerance import validate_fault_tolerance
from launcher.validate_moe import validate_experts
from models.hf import HFFormatError
from models.registry import families, model_spec
from parallel.checkpoint.backends import location_problem
from parallel.checkpoint.storage import is_url
from parallel.context_parallel import CP_COMM
from parallel.pipeline.registry import SCHEDULE_SPECS, SCHEDULES, PipelineLayout, pipeline_layout

OPTIM_IMPLEMENTATIONS = ("auto", "for_loop", "foreach", "fused")


def _check(ok: bool, field_name: str, value: object, fix: str) -> None:
    if not ok:
        raise ConfigError(field_name, value, fix)


def _finite(x: float) -> bool:
    return math.isfinite(x)


# (field, accepts, what to do otherwise): every number has a range. NaN fails every comparison,
# and inf is refused where a finite value is needed, so neither reaches the training step.
RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("model.dim", lambda v: 0 < v <= 2**20, "must be in [1, 1048576]"),
    ("model.n_layers", lambda v: 0 < v <= 10_000, "must be in [1, 10000]"),
    ("model.n_heads", lambda v: v > 0, "must be > 0"),
    ("model.vocab_size", lambda v: 0 < v <= 2**24, "must be in [1, 16777216]"),
    ("model.multiple_of", lambda v: v > 0, "must be > 0 (the SwiGLU width is rounded up to it)"),
    (
        "model.ffn_dim_multiplier",
        lambda v: v is None or (_finite(v) and v > 0),
        "must be > 0, or null",
    ),
    ("model.norm_eps", lambda v: _finite(v) and v > 0, "must be > 0, e.g. 1e-5"),
    ("model.rope_theta", lambda v: _finite(v) and v > 0, "must be > 0, e.g. 10000 or 500000"),
    ("model.rope_scale_factor", lambda v: _finite(v) and v > 0, "must be > 0"),
    ("model.max_seq_len", lambda v: v > 0, "must be > 0"),
    ("model.head_size", lambda v: v is None or 0 < v <= 2**16, "must be in [1, 65536], or null"),
    ("model.ffn_dim", lambda v: v is None or 0 < v <= 2**24, "must be in [1, 16777216], or null"),
    (
        "optim.lr",
        lambda v: _finite(v) and v > 0,
        "the learning rate must be finite and > 0, e.g. 3e-4",
    ),
    ("optim.min_lr_ratio", lambda v: 0 <= v <= 1, "use a value in [0, 1]"),
    ("optim.warmup_steps", lambda v: v >= 0, "must be >= 0"),
    ("optim.weight_decay", lambda v: _finite(v) and v >= 0, "must be finite and >= 0, e.g. 0.1"),
    ("optim.beta1", lambda v: 0 <= v < 1, "use a value in [0, 1), e.g. 0.9"),
    ("optim.beta2", lambda v: 0 <= v < 1, "use a value in [0, 1), e.g. 0.95"),
    ("optim.eps", lambda v: _finite(v) and v > 0, "must be finite and > 0, e.g. 1e-8"),
    ("optim.grad_clip", lambda v: _finite(v) and v >= 0, "must be finite and >= 0 (0 disables)"),
    (
        "hardware.peak_tflops",
        lambda v: v is None or (_finite(v) and v > 0),
        "must be > 0 (dense TFLOP/s per device), or null to detect the GPU",
    ),
    ("train.steps", lambda v: v > 0, "must be > 0"),
    ("train.global_batch_size", lambda v: v > 0, "must be > 0"),
    ("train.seq_len", lambda v: v > 0, "must be > 0"),
    ("train.log_interval", lambda v: v > 0, "must be > 0"),
    ("train.val_interval", lambda v: v > 0, "must be > 0"),
    ("train.val_batches", lambda v: v >= 1, "validate on at least 1 batch"),
    ("train.sample_tokens", lambda v: v >= 0, "must be >= 0 (0: no sample)"),
    ("train.nonfinite", lambda v: v in ("stop", "skip"), "use stop or skip"),
    ("train.nonfinite_max_skips", lambda v: v >= 1, "must be >= 1 (skipped steps in a row)"),
    (
        "data.max_bytes",
        lambda v: v > 0,
        "must be > 0 (bytes of text read for the stdlib/text corpus)",
    ),
    ("checkpoint.interval", lambda v: v >= 0, "must be >= 0 (0 = only at the end)"),
    ("checkpoint.keep", lambda v: v >= 1, "keep at least 1 checkpoint"),
    ("parallel.dp", lambda v: v > 0, "must be > 0"),
    ("parallel.pp", lambda v: v > 0, "must be > 0"),
    ("parallel.tp", lambda v: v > 0, "must be > 0"),
    ("parallel.cp", lambda v: v > 0, "must be > 0"),
    ("parallel.dp_replicate", lambda v: v > 0, "must be > 0 (1: no HSDP)"),
    ("parallel.virtual_stages", lambda v: v > 0, "must be > 0"),
    ("parallel.microbatches", lambda v: v > 0, "must be > 0"),
    ("parallel.p2p_ms", lambda v: _finite(v) and v >= 0, "must be finite and >= 0"),
    ("observe.interval", lambda v: v > 0, "must be > 0 (steps between phase-time gathers)"),
    ("observe.straggler_score", lambda v: 0 < v <= 1, "use a value in (0, 1], e.g. 0.7"),
    (
        "observe.hang_timeout_s",
        lambda v: _finite(v) and v >= 0,
        "must be finite and >= 0 seconds (0: no watchdog), e.g. 600",
    ),
]


def _value(cfg: Config, field_name: str) -> Any:
    section, key = field_name.split(".")
    return getattr(getattr(cfg, section), key)


def _validate_ranges(cfg: Config) -> None:
    for field_name, accepts, fix in RANGES:
        _check(accepts(_value(cfg, field_name)), field_name, _value(cfg, field_name), fix)


def _validate_profile(cfg: Config, world_size: int) -> None:
    steps, ranks, n = cfg.profile.steps, cfg.profile.ranks, cfg.train.steps
    ok = steps == [] or (len(steps) == 2 and 1 <= steps[0] <= steps[1] <= n)
    _check(ok, "profile.steps", steps, f"use [first, last] with 1 <= first <= last <= {n}, or []")
    bad = [r for r in ranks if not 0 <= r < world_size]
    _check(not bad, "profile.ranks", ranks, f"ranks must be in [0, {world_size - 1}]")


def validate(cfg: Config, world_size: int, ranks_per_node: int | None = None) -> None:
    """Refuse settings that cannot work, before any process group is started.

    ranks_per_node: processes per node (torchrun's LOCAL_WORLD_SIZE), to keep TP inside a node;
    None when unknown."""
    m, t, par = cfg.model, cfg.train, cfg.parallel
    _check(m.family in families(), "model.family", m.family, f"use {', '.join(families())}")
    _check(cfg.device in ("auto", "cpu", "cuda"), "device", cfg.device, "use auto, cpu or cuda")
    _check(
        cfg.precision in ("auto", "fp32", "bf16"),
        "precision",
        cfg.precision,
        "use auto, fp32 or bf16",
    )
    _validate_ranges(cfg)
    _validate_profile(cfg, world_size)
    _check(
        cfg.optim.implementation in OPTIM_IMPLEMENTATIONS,
        "optim.implementation",
        cfg.optim.implementation,
        f"use {', '.join(OPTIM_IMPLEMENTATIONS)}",
    )
    _check(
        m.head_size is not None or m.dim % m.n_heads == 0,
        "model.n_heads",
        m.n_heads,
        f"must divide model.dim={m.dim} (or set model.head_size)",
    )
    _check(
        m.kv_heads > 0 and m.n_heads % m.kv_heads == 0,
        "model.n_kv_heads",
        m.n_kv_heads,
        f"must divide model.n_heads={m.n_heads} (e.g. {_divisor_near(m.n_heads, m.kv_heads)})",
    )
    _check(
        m.head_dim % 2 == 0,
        "model.head_size" if m.head_size else "model.dim",
        m.head_size or m.dim,
        "the head width (head_size, or dim / n_heads) must be even for RoPE",
    )
    _check(
        m.activation_checkpointing in ("none", "full", "selective"),
        "model.activation_checkpointing",
        m.activation_checkpointing,
        "use none, full or selective",
    )
    _check(
        m.init_from is None or os.path.isdir(m.init_from),
        "model.init_from",
        m.init_from,
        "must be a Hugging Face model directory that exists",
    )
    if m.init_from is not None:
        try:  # another family's or another shape's model is refused before any process starts
            model_spec(m.family).hf.check_directory(m.init_from, m)
        except HFFormatError as err:
            raise ConfigError("model.init_from", m.init_from, str(err)) from None
    _check(
        t.seq_len <= m.max_seq_len,
        "train.seq_len",
        t.seq_len,
        f"must be <= model.max_seq_len={m.max_seq_len}",
    )
    _validate_data(cfg.data)
    _check(
        t.resume in ("none", "auto") or is_url(t.resume) or os.path.exists(t.resume),
        "train.resume",
        t.resume,
        "use none, auto, or the path of a checkpoint (or of a checkpoint folder)",
    )
    for name, where in (("checkpoint.dir", cfg.checkpoint.dir), ("train.resume", t.resume)):
        # an fsspec URL: its protocol's package must import here, before any rank starts
        problem = location_problem(where) if where else None
        _check(problem is None, name, where, problem or "")
    _check(
        cfg.logging.progress in ("auto", "bar", "lines"),
        "logging.progress",
        cfg.logging.progress,
        "use auto, bar or lines",
    )
    ft = cfg.fault_tolerance
    # under fault tolerance each replica group is its own world of dp/dp_replicate x pp x cp x tp
    layout = par.world_size // (par.dp_replicate if ft.enable else 1)
    _check(
        layout == world_size,
        "parallel.dp",
        par.dp,
        f"{par.layout_product()} must equal the world size {world_size}; "
        f"set parallel.dp={world_size // (par.pp * par.cp * par.tp) or 1} or launch {layout} ranks"
        + (" per replica group (parallel.dp counts every group's ranks)" if ft.enable else ""),
    )
    split = par.layers_per_stage
    _check(
        split in (None, "even", "auto")
        or isinstance(split, list)
        and all(isinstance(n, int) and not isinstance(n, bool) for n in split),
        "parallel.layers_per_stage",
        split,
        "use null (even unless the cost model's split is faster), even, auto, or a list of "
        "blocks per stage, e.g. [3,3,2,0]",
    )
    _check(
        par.pp > 1 or not isinstance(split, list),
        "parallel.layers_per_stage",
        split,
        "a split into pipeline stages needs parallel.pp > 1; remove it or raise pp",
    )
    _check(
        par.pp > 1 or par.stage_costs is None,
        "parallel.stage_costs",
        par.stage_costs,
        "per-stage costs need a pipeline (parallel.pp > 1); remove them or raise pp",
    )
    _check(
        par.p2p_ms == 0 or par.stage_costs is not None,
        "parallel.p2p_ms",
        par.p2p_ms,
        "only read with parallel.stage_costs; remove it or give the stage costs too",
    )
    _validate_batch(t.global_batch_size, par.dp, par.microbatches)
    _validate_tensor_parallel(m, par, t, ranks_per_node)
    _validate_context_parallel(par, t)
    _validate_documents_device(cfg)
    _validate_hsdp(par)
    validate_experts(cfg)
    _validate_pipeline(m, par, t.seq_len, t.compile)
    if ft.enable:
        validate_fault_tolerance(cfg)


def _validate_tensor_parallel(
    m: ModelConfig, par: ParallelConfig, t: TrainConfig, ranks_per_node: int | None
) -> None:
    for name, heads in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads)):
        _check(
            heads % par.tp == 0,
            name,
            heads,
            f"must be divisible by parallel.tp={par.tp}; "
            f"use tp in {[d for d in range(1, heads + 1) if heads % d == 0 and m.n_heads % d == 0]}",
        )
    _check(
        m.vocab_size % par.tp == 0,
        "model.vocab_size",
        m.vocab_size,
        f"must be divisible by parallel.tp={par.tp} (the embedding is split by vocabulary)",
    )
    per_node = ranks_per_node or par.tp  # unknown: trust the layout
    _check(
        par.tp <= per_node and per_node % par.tp == 0 or par.allow_cross_node_tp,
        "parallel.tp",
        par.tp,
        f"a TP group must fit inside one node ({per_node} ranks per node); lower tp or set "
        "parallel.allow_cross_node_tp=true",
    )
    if not par.sequence_parallel or par.tp == 1:
        return
    # sequence parallelism splits every sequence into tp equal slices between blocks
    _check(
        t.seq_len % par.tp == 0,
        "train.seq_len",
        t.seq_len,
        f"must be divisible by parallel.tp={par.tp} with parallel.sequence_parallel=true; set "
        f"train.seq_len={max(par.tp, t.seq_len // par.tp * par.tp)} or parallel.sequence_parallel=false",
    )


def _validate_context_parallel(par: ParallelConfig, t: TrainConfig) -> None:
    _check(
        par.cp_comm in CP_COMM,
        "parallel.cp_comm",
        par.cp_comm,
        f"use {' or '.join(CP_COMM)} (all-gather of K/V, or K/V blocks passed around a ring)",
    )
    if par.cp == 1:
        return
    # each sequence is cut into 2*cp load-balanced chunks; under SP a rank's s/cp tokens split by tp
    sp = par.sequence_parallel and par.tp > 1
    unit = math.lcm(2 * par.cp, par.cp * par.tp) if sp else 2 * par.cp
    what = "lcm(2*cp, cp*tp)" if sp else "2*cp"
    _check(
        t.seq_len % unit == 0,
        "train.seq_len",
        t.seq_len,
        f"must be divisible by {what} = {unit} with parallel.cp={par.cp} (each sequence is cut "
        f"into 2*cp load-balanced chunks); set train.seq_len={max(unit, t.seq_len // unit * unit)} "
        "or lower parallel.cp",
    )


def _validate_hsdp(par: ParallelConfig) -> None:
    if par.dp_replicate == 1:
        return
    _check(
        par.dp % par.dp_replicate == 0,
        "parallel.dp_replicate",
        par.dp_replicate,
        f"must divide parallel.dp={par.dp} (dp = replica groups x ranks sharding within a "
        f"group); use one of {[d for d in range(1, par.dp + 1) if par.dp % d == 0]}",
    )
    _check(
        par.dp_shard,
        "parallel.dp_replicate",
        par.dp_replicate,
        "parallel.dp_shard=false already replicates over all of dp; set dp_replicate=1, or "
        "dp_shard=true for HSDP",
    )


def _validate_pipeline(m: ModelConfig, par: ParallelConfig, seq_len: int, compile: bool) -> None:
    from parallel.pipeline.split import choose_split
    from parallel.plan.parts import part_costs

    s, v, pp = par.schedule, par.virtual_stages, par.pp
    _check(s in SCHEDULES, "parallel.schedule", s, f"choose one of {', '.join(SCHEDULES)}")
    if pp == 1:
        _check(
            v == 1, "parallel.virtual_stages", v, "virtual stages need parallel.pp > 1; set it to 1"
        )
        return
    layout = pipeline_layout(s, pp, v, par.microbatches)
    problem = layout.problem()  # the schedule's own rules
    if problem is not None:
        raise ConfigError(f"parallel.{problem.setting}", problem.value, problem.fix)
    allowed = [n for n, spec in SCHEDULE_SPECS.items() if spec.compiled_stages]
    _check(
        not compile or layout.spec.compiled_stages,
        "train.compile",
        compile,
        f"torch 2.13 refuses compiled stages in parallel.schedule={s} (pytorch#161904); set "
        f"train.compile=false or use one of {', '.join(allowed)}",
    )
    try:
        choose_split(part_costs(m, seq_len), m.n_layers, layout, par.layers_per_stage)
    except ValueError as err:
        raise ConfigError("parallel.layers_per_stage", par.layers_per_stage, str(err)) from None
    _validate_stage_costs(par, layout)


def _validate_stage_costs(par: ParallelConfig, layout: PipelineLayout) -> None:
    costs = par.stage_costs
    if costs is None:
        return
    searched = [n for n, spec in SCHEDULE_SPECS.items() if spec.searched]
    _check(
        layout.spec.searched,
        "parallel.stage_costs",
        costs,
        f"only {', '.join(searched[:-1])} and {searched[-1]} search an order from costs; "
        "remove it or use one of them",
    )
    _check(
        len(costs) == layout.n_stages
        and all(len(row) == 3 and all(_finite(c) and c > 0 for c in row) for row in costs),
        "parallel.stage_costs",
        costs,
        f"give one [F, I, W] of positive times per pipeline stage ({layout.n_stages}), "
        f"e.g. {[[1.0, 1.0, 1.0]] * layout.n_stages}",
    )


DOCUMENT_OPTIONS = ("document_mask", "reset_position_ids", "eod_mask_loss")


def validate_documents(d: DataConfig, eos_id: int | None) -> None:
    """Document options need a source with an end-of-document id (checked once it is built)."""
    for name in DOCUMENT_OPTIONS:
        _check(
            not getattr(d, name) or eos_id is not None,
            f"data.{name}",
            True,
            f"data.source={d.source} has no end-of-document id to find documents by (byte-level "
            "stdlib/text sources end each file with byte 0); use such a source or set it false",
        )


def _validate_documents_device(cfg: Config) -> None:
    par = cfg.parallel
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    _check(
        not (cfg.data.document_mask and par.cp > 1 and par.cp_comm == "ring" and cuda),
        "parallel.cp_comm",
        par.cp_comm,
        "data.document_mask on CUDA runs with parallel.cp_comm=all_gather (torch's ring "
        "attention takes no mask)",
    )


def _validate_data(d: DataConfig) -> None:
    _check(
        d.source in SOURCES,
        "data.source",
        d.source,
        f"use {', '.join(SOURCES[:-1])} or {SOURCES[-1]}",
    )
    # an option that does not apply to the source is refused, not ignored
    if d.source == "indexed":
        _check(d.path is None, "data.path", d.path, "data.source=indexed reads data.paths instead")
        _validate_indexed_paths(d.paths)
    else:
        _check(not d.paths, "data.paths", list(d.paths), "only data.source=indexed blends paths")
    if d.source not in ("stdlib", "indexed"):
        _check(
            d.path is not None and os.path.exists(d.path),
            "data.path",
            d.path,
            f"data.source={d.source} needs an existing file or folder",
        )
    if d.tokenizer is not None:
        _check(
            os.path.isfile(d.tokenizer) and os.access(d.tokenizer, os.R_OK),
            "data.tokenizer",
            d.tokenizer,
            "must be a readable Hugging Face tokenizer.json file",
        )
    _check(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "use a value in (0, 1)")


def _validate_indexed_paths(paths: list[Any]) -> None:
    """A well-formed blend whose prefixes all have their .bin and .idx (contents: load_data)."""
    try:
        _, prefixes = parse_blend(list(paths))
    except ValueError as err:
        raise ConfigError(
            "data.paths", list(paths), f"{err}, e.g. data.paths=[0.3,corpus/a,0.7,corpus/b]"
        ) from None
    for prefix in prefixes:
        missing = [s for s in (".bin", ".idx") if not os.path.isfile(prefix + s)]
        _check(
            not missing,
            "data.paths",
            prefix,
            f"{prefix}{'/'.join(missing)} not found: give prefixes written by "
            "`python -m launcher.preprocess` (or Megatron's tools), without .bin/.idx",
        )


def _validate_batch(global_batch: int, dp: int, microbatches: int) -> None:
    unit = dp * microbatches
    if global_batch % unit:
        lower = max(unit, global_batch // unit * unit)
        raise ConfigError(
            "train.global_batch_size",
            global_batch,
            f"must split evenly into dp*microbatches = {dp}*{microbatches} = {unit}; "
            f"use {lower} or {lower + unit}",
        )


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))
