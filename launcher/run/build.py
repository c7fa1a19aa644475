"""Config in, a ready Trainer out: token source, process group and mesh, the parallel model,
the sampler and the optimizer."""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from data import DistributedBatchSampler, TokenSource, build_token_source
from launcher.config import Config, ConfigError
from launcher.run.fault_tolerance import dp_offset, group_dp, replica_group
from launcher.run.trainer import Trainer, uses_bf16
from launcher.validate import validate_documents
from models.args import ModelArgs
from parallel.init import InitialValues
from parallel.mesh import build_mesh, resolve_device
from parallel.parallelize import ParallelOptions, parallelize
from parallel.pipeline.costs import StageCosts
from parallel.pipeline.registry import PipelineLayout, pipeline_layout
from parallel.pipeline.split import SplitChoice, choose_split
from parallel.plan.parts import part_costs


def model_args(cfg: Config) -> ModelArgs:
    """The architecture part of the model config."""
    return ModelArgs(**{f.name: getattr(cfg.model, f.name) for f in fields(ModelArgs)})


def pipeline_of(cfg: Config) -> PipelineLayout:
    """parallel.schedule resolved once on the run's pp, virtual stages and microbatches."""
    p = cfg.parallel
    return pipeline_layout(p.schedule, p.pp, p.virtual_stages, p.microbatches)


def pipeline_split(cfg: Config) -> SplitChoice | None:
    """The blocks per pipeline stage the run uses (parallel.layers_per_stage resolved), or None
    without pipelining."""
    if cfg.parallel.pp == 1:
        return None
    args = model_args(cfg)
    costs = part_costs(args, cfg.train.seq_len)
    return choose_split(costs, args.n_layers, pipeline_of(cfg), cfg.parallel.layers_per_stage)


def parallel_options(cfg: Config, device: torch.device) -> ParallelOptions:
    """Everything `parallelize` needs beyond the mesh, from the config, once."""
    par = cfg.parallel
    return ParallelOptions(
        pipeline=pipeline_of(cfg),
        layers=split.counts if (split := pipeline_split(cfg)) else None,
        dp_shard=par.dp_shard,
        dp_replicate=par.dp_replicate,
        cp_comm=par.cp_comm,
        activation_checkpointing=cfg.model.activation_checkpointing,
        sequence_parallel=par.sequence_parallel,
        stage_costs=stage_costs(par.stage_costs, par.p2p_ms),
        compile=cfg.train.compile,
        param_dtype=torch.bfloat16 if uses_bf16(device, cfg.precision) else None,
        ep=par.ep,
    )


def stage_costs(rows: list[list[float]] | None, p2p_ms: float) -> StageCosts | None:
    """parallel.stage_costs ([F, I, W] per stage) as the StageCosts a searched order reads."""
    if rows is None:
        return None
    f, i, w = (tuple(float(row[k]) for row in rows) for k in range(3))
    return StageCosts(f, i, w, p2p_ms)


def load_data(cfg: Config) -> TokenSource:
    """Build the token source; a missing or unreadable file is a config error."""
    d = cfg.data
    try:
        source = build_token_source(
            d.source, d.path, d.tokenizer, d.val_fraction, d.max_bytes, d.paths, cfg.train.seq_len
        )
    except (FileNotFoundError, ValueError) as err:
        field_name = "data.tokenizer" if d.tokenizer and d.tokenizer in str(err) else "data.path"
        if d.source == "indexed" and field_name == "data.path":
            raise ConfigError("data.paths", list(d.paths), str(err)) from None
        raise ConfigError(field_name, getattr(d, field_name.split(".")[1]), str(err)) from None
    validate_documents(d, source.eos_id)
    if d.source == "indexed":
        _check_packed_samples(cfg, source)
        return _check_vocab(cfg, source)
    needed = cfg.train.global_batch_size * cfg.train.seq_len + 1  # one batch; targets shift by 1
    if len(source.val) < needed:
        raise ConfigError(
            "data.val_fraction",
            d.val_fraction,
            f"the validation split holds {len(source.val):,} tokens, fewer than one batch of "
            f"train.global_batch_size x train.seq_len + 1 = {needed:,}; raise data.val_fraction, "
            "use more data, or lower train.global_batch_size or train.seq_len",
        )
    if len(source.train) < needed:
        raise ConfigError(
            "data.path",
            d.path,
            f"the training split holds {len(source.train):,} tokens, fewer than one batch of "
            f"{needed:,}; use more data or lower train.global_batch_size or train.seq_len",
        )
    return _check_vocab(cfg, source)


def _check_packed_samples(cfg: Config, source: TokenSource) -> None:
    """The blend's validation split fills one global batch of packed samples."""
    gbs = cfg.train.global_batch_size
    n_val = getattr(source.val, "n_samples", 0)
    if n_val < gbs:
        raise ConfigError(
            "data.val_fraction",
            cfg.data.val_fraction,
            f"the validation documents pack into {n_val} samples of train.seq_len + 1 tokens, "
            f"fewer than train.global_batch_size={gbs}; raise data.val_fraction or use more data",
        )


def _check_vocab(cfg: Config, source: TokenSource) -> TokenSource:
    if source.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            cfg.model.vocab_size,
            f"the data has {source.vocab_size} token ids; set model.vocab_size >= that",
        )
    return source


def build_trainer(
    cfg: Config, tokens: TokenSource, initial_values: InitialValues | None = None
) -> Trainer:
    """Start the process group and mesh, build this rank's model, sampler and optimizer.

    initial_values: where the weights come from (default: drawn from train.seed)."""
    par = cfg.parallel
    device = resolve_device(cfg.device)
    ft = (
        cfg.fault_tolerance.enable
    )  # the replicate dim spans torch worlds: torchft's, not a mesh dim
    mesh = build_mesh(device, group_dp(cfg), par.pp, par.tp, cp=par.cp)
    torch.manual_seed(cfg.train.seed)
    options = parallel_options(cfg, device)
    if ft:  # the replicate dim is torchft's: FSDP2 (or nothing) inside the group only
        options = replace(options, dp_replicate=1)
    model = parallelize(model_args(cfg), mesh, device, cfg.train.seed, options, initial_values)
    # every cp rank of a dp rank reads the same sequences, then keeps its chunks of them
    sampler = DistributedBatchSampler(
        tokens.train,
        cfg.train.seq_len,
        cfg.train.global_batch_size,
        dp_offset(cfg) + mesh["dp"].get_local_rank(),
        par.dp,
        cfg.train.seed,
    )
    trainer = Trainer(cfg, model, sampler, device, eos_id=tokens.eos_id)
    if ft:
        trainer.replicas = replica_group(cfg, trainer)
    return trainer
