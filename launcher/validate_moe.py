"""Validation of Mixture-of-Experts settings (model.n_experts and friends, parallel.ep) before any
process group starts: one ConfigError naming the field, the value and the fix."""

from __future__ import annotations

import math

from launcher.config import Config, ConfigError
from models.registry import model_spec


def _check(ok: bool, field_name: str, value: object, fix: str) -> None:
    if not ok:
        raise ConfigError(field_name, value, fix)


def validate_experts(cfg: Config) -> None:
    """Refuse a MoE shape or an expert-parallel layout that cannot work."""
    m, par = cfg.model, cfg.parallel
    moe = model_spec(m.family).block_feed_forward == "moe"
    _check(par.ep >= 1, "parallel.ep", par.ep, "must be >= 1 (1: no expert parallelism)")
    if not moe:
        _check(
            m.n_experts == 0,
            "model.n_experts",
            m.n_experts,
            f"the {m.family} family's feed-forwards are dense; use a MoE family "
            "(e.g. model=qwen3_moe_debug) or remove it",
        )
        _check(
            par.ep == 1,
            "parallel.ep",
            par.ep,
            f"expert parallelism needs a Mixture-of-Experts model; {m.name} has no experts "
            "(e.g. model=qwen3_moe_debug, or parallel.ep=1)",
        )
        return
    _check(m.n_experts >= 1, "model.n_experts", m.n_experts, "a MoE model needs >= 1 expert")
    _check(
        1 <= m.experts_per_token <= m.n_experts,
        "model.experts_per_token",
        m.experts_per_token,
        f"top-k must be in [1, model.n_experts={m.n_experts}]",
    )
    _check(
        m.moe_ffn_dim is None or m.moe_ffn_dim > 0,
        "model.moe_ffn_dim",
        m.moe_ffn_dim,
        "must be > 0, or null (the dense width)",
    )
    _check(
        m.shared_expert_ffn_dim >= 0,
        "model.shared_expert_ffn_dim",
        m.shared_expert_ffn_dim,
        "must be >= 0 (0: no shared expert)",
    )
    for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
        value = getattr(m, name)
        _check(math.isfinite(value) and value >= 0, f"model.{name}", value, "must be >= 0")
    # the sequence-wise balance loss reads whole sequences on one rank
    _check(
        par.cp == 1,
        "parallel.cp",
        par.cp,
        "context parallelism with a MoE model is not built yet (the balance loss needs each "
        "sequence whole); use parallel.cp=1",
    )
    _check(
        not par.sequence_parallel,
        "parallel.sequence_parallel",
        par.sequence_parallel,
        "not built yet for MoE models (the router and experts are replicated across tp); "
        "set it to false",
    )
    _check(
        not cfg.train.compile,
        "train.compile",
        cfg.train.compile,
        "not built yet for MoE models (dropless routing's data-dependent group sizes break "
        "the blocks' fullgraph compile); set it to false",
    )
    if par.ep == 1:
        return
    dp_cp = par.dp * par.cp
    _check(
        dp_cp % par.ep == 0,
        "parallel.ep",
        par.ep,
        f"expert parallelism borrows its ranks from dp x cp = {dp_cp}: ep must divide it "
        f"(e.g. parallel.ep={math.gcd(dp_cp, m.n_experts)})",
    )
    _check(
        m.n_experts % par.ep == 0,
        "parallel.ep",
        par.ep,
        f"must divide model.n_experts={m.n_experts} (each ep rank holds n_experts / ep experts)",
    )
    _check(
        par.dp_replicate == 1,
        "parallel.dp_replicate",
        par.dp_replicate,
        "HSDP with expert parallelism is not built yet; use parallel.dp_replicate=1 or "
        "parallel.ep=1",
    )
    _check(
        not cfg.fault_tolerance.enable,
        "fault_tolerance.enable",
        cfg.fault_tolerance.enable,
        "fault-tolerant replicas with expert parallelism are not built yet; use parallel.ep=1",
    )
