"""Validation of a typed Config before any process group starts: every value that cannot work
is a ConfigError naming the field, the value and a fix."""

from __future__ import annotations

import os

from launcher.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)
from parallel.schedules import SCHEDULES, SCHEDULES_ONE_STAGE_PER_RANK, SCHEDULES_V_SHAPE


def _check(ok: bool, field_name: str, value: object, fix: str) -> None:
    if not ok:
        raise ConfigError(field_name, value, fix)


def _positive(name: str, value: int | float) -> None:
    _check(value > 0, name, value, "must be > 0")


def validate(cfg: Config, world_size: int, ranks_per_node: int | None = None) -> None:
    """Refuse settings that cannot work, before any process group is started.

    ranks_per_node: processes per node (torchrun's LOCAL_WORLD_SIZE), to keep TP inside a node;
    None when unknown."""
    m, t, par = cfg.model, cfg.train, cfg.parallel
    _check(cfg.device in ("auto", "cpu", "cuda"), "device", cfg.device, "use auto, cpu or cuda")
    _check(cfg.precision in ("auto", "fp32", "bf16"), "precision", cfg.precision, "use auto, fp32 or bf16")
    for name in ("dim", "n_layers", "n_heads", "vocab_size"):
        _positive(f"model.{name}", getattr(m, name))
    _check(m.dim % m.n_heads == 0, "model.n_heads", m.n_heads, f"must divide model.dim={m.dim}")
    _check(m.kv_heads > 0 and m.n_heads % m.kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
           f"must divide model.n_heads={m.n_heads} (e.g. {_divisor_near(m.n_heads, m.kv_heads)})")
    _check(m.head_dim % 2 == 0, "model.dim", m.dim, "dim / n_heads must be even for RoPE")
    _check(m.activation_checkpointing in ("none", "full", "selective"),
           "model.activation_checkpointing", m.activation_checkpointing, "use none, full or selective")
    _check(m.init_from is None or os.path.isdir(m.init_from), "model.init_from", m.init_from,
           "must be a Hugging Face Llama directory that exists")
    _check(cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "the learning rate must be > 0, e.g. 3e-4")
    _check(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", cfg.optim.min_lr_ratio, "use a value in [0, 1]")
    _check(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", cfg.optim.warmup_steps, "must be >= 0")
    _check(cfg.optim.grad_clip >= 0, "optim.grad_clip", cfg.optim.grad_clip, "must be >= 0 (0 disables)")
    for name in ("steps", "global_batch_size", "seq_len", "log_interval", "val_interval"):
        _positive(f"train.{name}", getattr(t, name))
    _check(t.seq_len <= m.max_seq_len, "train.seq_len", t.seq_len, f"must be <= model.max_seq_len={m.max_seq_len}")
    _validate_data(cfg.data)
    c = cfg.checkpoint
    _check(c.interval >= 0, "checkpoint.interval", c.interval, "must be >= 0 (0 = only at the end)")
    _check(c.keep >= 1, "checkpoint.keep", c.keep, "keep at least 1 checkpoint")
    _check(t.resume in ("none", "auto") or os.path.exists(t.resume), "train.resume", t.resume,
           "use none, auto, or the path of a checkpoint (or of a checkpoint folder)")
    _check(cfg.logging.progress in ("auto", "bar", "lines"), "logging.progress",
           cfg.logging.progress, "use auto, bar or lines")
    for name in ("dp", "pp", "tp", "virtual_stages", "microbatches"):
        _positive(f"parallel.{name}", getattr(par, name))
    layout = par.dp * par.pp * par.tp
    _check(layout == world_size, "parallel.dp", par.dp,
           f"dp*pp*tp = {par.dp}*{par.pp}*{par.tp} = {layout} must equal the world size {world_size}; "
           f"set parallel.dp={world_size // (par.pp * par.tp) or 1} or launch {layout} ranks")
    _validate_batch(t.global_batch_size, par.dp, par.microbatches)
    _validate_tensor_parallel(m, par, t, ranks_per_node)
    _validate_pipeline(m, par)


def _validate_tensor_parallel(m: ModelConfig, par: ParallelConfig, t: TrainConfig, ranks_per_node: int | None) -> None:
    for name, heads in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads)):
        _check(heads % par.tp == 0, name, heads, f"must be divisible by parallel.tp={par.tp}; "
               f"use tp in {[d for d in range(1, heads + 1) if heads % d == 0 and m.n_heads % d == 0]}")
    _check(m.vocab_size % par.tp == 0, "model.vocab_size", m.vocab_size,
           f"must be divisible by parallel.tp={par.tp} (the embedding is split by vocabulary)")
    per_node = ranks_per_node or par.tp  # unknown: trust the layout
    _check(par.tp <= per_node and per_node % par.tp == 0 or par.allow_cross_node_tp, "parallel.tp", par.tp,
           f"a TP group must fit inside one node ({per_node} ranks per node); lower tp or set "
           "parallel.allow_cross_node_tp=true")
    if not par.sequence_parallel or par.tp == 1:
        return
    # sequence parallelism splits every sequence into tp equal slices between blocks
    _check(t.seq_len % par.tp == 0, "train.seq_len", t.seq_len,
           f"must be divisible by parallel.tp={par.tp} with parallel.sequence_parallel=true; set "
           f"train.seq_len={max(par.tp, t.seq_len // par.tp * par.tp)} or parallel.sequence_parallel=false")


def _validate_pipeline(m: ModelConfig, par: ParallelConfig) -> None:
    from parallel.pipeline import layers_per_stage

    s, v, pp, mb = par.schedule, par.virtual_stages, par.pp, par.microbatches
    _check(s in SCHEDULES, "parallel.schedule", s, f"choose one of {', '.join(SCHEDULES)}")
    if pp == 1:
        _check(v == 1, "parallel.virtual_stages", v, "virtual stages need parallel.pp > 1; set it to 1")
        return
    if s in SCHEDULES_ONE_STAGE_PER_RANK:
        _check(v == 1, "parallel.virtual_stages", v,
               f"{s} runs one stage per rank; set virtual_stages=1 or use interleaved_1f1b")
    if s in SCHEDULES_V_SHAPE:
        _check(v == 2, "parallel.virtual_stages", v, f"{s} places exactly two stages per rank; set it to 2")
    n_stages = pp * v
    if s == "1f1b" or s == "dualpipev":
        _check(mb >= n_stages, "parallel.microbatches", mb,
               f"{s} needs at least as many microbatches as stages ({n_stages})")
    if s in ("interleaved_1f1b", "interleaved_zb"):
        rounds = max(1, mb // pp)
        _check(mb % rounds == 0, "parallel.microbatches", mb,
               f"{s} runs microbatches in rounds of pp={pp}; use a multiple of {pp}, e.g. {rounds * pp}")
    _check(not m.tie_embeddings, "model.tie_embeddings", True,
           "tied embeddings with pp > 1 put the embedding and head on different stages; "
           "set model.tie_embeddings=false (the default) or pp=1")
    try:
        layers_per_stage(m.n_layers, n_stages, par.layers_per_stage)
    except ValueError as err:
        raise ConfigError("parallel.layers_per_stage", par.layers_per_stage, str(err)) from None


def _validate_data(d: DataConfig) -> None:
    _check(d.source in ("stdlib", "tokens", "text"), "data.source", d.source, "use stdlib, tokens or text")
    if d.source != "stdlib":
        _check(d.path is not None and os.path.exists(d.path), "data.path", d.path,
               f"data.source={d.source} needs an existing file or folder")
    if d.tokenizer is not None:
        _check(os.path.isfile(d.tokenizer) and os.access(d.tokenizer, os.R_OK), "data.tokenizer",
               d.tokenizer, "must be a readable Hugging Face tokenizer.json file")
    _check(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "use a value in (0, 1)")


def _validate_batch(global_batch: int, dp: int, microbatches: int) -> None:
    unit = dp * microbatches
    if global_batch % unit:
        lower = max(unit, global_batch // unit * unit)
        raise ConfigError("train.global_batch_size", global_batch,
                          f"must split evenly into dp*microbatches = {dp}*{microbatches} = {unit}; "
                          f"use {lower} or {lower + unit}")


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))
