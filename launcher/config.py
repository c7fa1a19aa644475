"""The one typed config schema, and its validation before any process group starts.

Hydra composes plain YAML from conf/; `load_config` merges it onto these dataclasses (so a
wrong type is caught with its key) and `validate` checks the values that depend on each other.
Every failure is a ConfigError naming the field, the value and a fix; the launcher prints it
on one line and exits with code 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.llama import ModelArgs

SCHEDULES_ONE_STAGE_PER_RANK = ("gpipe", "1f1b")
SCHEDULES_LOOPED = ("interleaved_1f1b", "looped_bfs", "interleaved_zb")
SCHEDULES_V_SHAPE = ("zbv", "dualpipev")
SCHEDULES = SCHEDULES_ONE_STAGE_PER_RANK + SCHEDULES_LOOPED + SCHEDULES_V_SHAPE


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, the value and the fix."""

    def __init__(self, field_name: str, value: object, fix: str) -> None:
        super().__init__(f"config error: {field_name}={value!r}: {fix}")
        self.field_name = field_name


@dataclass
class ModelConfig(ModelArgs):
    """Model flavor: the architecture plus how to build and initialize it."""

    name: str = "tiny"
    activation_checkpointing: str = "none"  # none | full | selective
    init_from: str | None = None  # a Hugging Face Llama directory


@dataclass
class DataConfig:
    """Where tokens come from."""

    source: str = "stdlib"  # stdlib | tokens | text
    path: str | None = None
    tokenizer: str | None = None  # Hugging Face tokenizer.json, for source=text (or decoding)
    val_fraction: float = 0.05
    max_bytes: int = 4_000_000


@dataclass
class ParallelConfig:
    """The device mesh (dp, pp, tp) and the pipeline schedule."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    virtual_stages: int = 1
    schedule: str = "1f1b"
    microbatches: int = 1
    layers_per_stage: list[int] | None = None
    dp_shard: bool = True  # FSDP2 over dp; false replicates (DDP-style)
    sequence_parallel: bool = False
    allow_cross_node_tp: bool = False
    timeline: bool = False  # record one step's pipeline actions on every rank (trace + PNG)


@dataclass
class TrainConfig:
    """Length, batch and seed of the run."""

    steps: int = 240
    global_batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    log_interval: int = 10
    val_interval: int = 100
    val_batches: int = 4
    sample_tokens: int = 240
    resume: str = "none"


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written (see parallel/checkpoint.py)."""

    dir: str | None = None  # default: <run dir>/checkpoints
    interval: int = 0  # save every N steps; 0 = only at the end (and on a preemption signal)
    keep: int = 3  # complete checkpoints kept; older ones are deleted after a save
    async_save: bool = False  # write in the background; the step loop waits only for staging
    verify: bool = True  # check shard CRC32s when loading


@dataclass
class WandbConfig:
    """Weights & Biases: online when WANDB_API_KEY is set, offline otherwise."""

    enabled: bool = False
    project: str = "tridist"
    entity: str | None = None
    name: str | None = None


@dataclass
class LoggingConfig:
    """Where metrics go besides the console and metrics.jsonl."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines


@dataclass
class HardwareConfig:
    """Peak throughput for MFU; null = filled in from the GPU's name (required on CPU for MFU)."""

    peak_tflops: float | None = None


@dataclass
class ClusterConfig:
    """The machines a plan is made for (launcher/plan.py); training ignores it."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    intra_node_gbps: float = 450.0  # GB/s per GPU inside a node (NVLink)
    inter_node_gbps: float = 50.0  # GB/s per GPU across nodes (400 Gb/s InfiniBand)
    peak_tflops: float = 989.0  # dense bf16 per GPU (H100 SXM)


@dataclass
class Config:
    """Everything a training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16


def register_schema_defaults() -> None:
    """Give Hydra every schema key with its default (untyped), so any field can be overridden;
    types are checked afterwards by load_config, which reports them as ConfigErrors."""
    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    ConfigStore.instance().store(name="schema_defaults", node=defaults)


register_schema_defaults()


def load_config(raw: DictConfig) -> Config:
    """Merge Hydra's composed config onto the typed schema; type errors become ConfigErrors."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        reason = str(err).splitlines()[0]
        raise ConfigError(key, getattr(err, "value", None), f"{reason}; fix the value or its type") from None


def _check(ok: bool, field_name: str, value: object, fix: str) -> None:
    if not ok:
        raise ConfigError(field_name, value, fix)


def _positive(name: str, value: int | float) -> None:
    _check(value > 0, name, value, "must be > 0")


def validate(cfg: Config, world_size: int, ranks_per_node: int | None = None) -> None:
    """Refuse settings that cannot work, before any process group is started."""
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
    per_node = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", par.tp))
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
