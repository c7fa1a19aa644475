"""Model FLOPs per token (PaLM's 6N + 12·L·H·Q·T) and the device peak that MFU divides by.

MFU counts the model's FLOPs only: recomputation under activation checkpointing is not
credited, so MFU does not rise by recomputing (PaLM, appendix B). N is the matmul parameters a
token goes through: a Mixture-of-Experts model's active ones (its router, its k routed experts
and the shared expert, not the E - k others), as its family counts them.
"""

from __future__ import annotations

import torch

from models.args import ModelArgs
from models.registry import model_spec

# dense bf16 tensor-core peaks per device, TFLOP/s, from the vendors' data sheets; matched in
# order against the lower-cased device name, so the more specific names come first
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),  # SXM
    ("h800", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("v100", 125.0),  # fp16: V100 has no bf16
    ("mi300x", 1307.0),
    ("mi250x", 383.0),
)
# the peak a plan assumes when hardware.peak_tflops is not set: H100 SXM's
PLAN_DEFAULT_PEAK_TFLOPS = dict(GPU_PEAK_TFLOPS)["h100"]


def non_embedding_parameters(args: ModelArgs) -> int:
    """Parameters of the whole model minus the input embedding, counted on the meta device.

    The embedding is a lookup, not a matmul; with tied embeddings the shared matrix still does
    the output head's matmul, so it stays in.
    """
    with torch.device("meta"):
        model = model_spec(args.family).build(args)
    total = sum(p.numel() for p in model.parameters())  # a tied matrix is listed once
    assert model.tok_embeddings is not None  # a whole model has all its parts
    return total if args.tie_embeddings else total - model.tok_embeddings.weight.numel()


def active_non_embedding_parameters(args: ModelArgs) -> int:
    """The non-embedding parameters one token goes through: all of them for a dense model; a
    MoE's less the routed experts it is not sent to (its spec's parameter_count minus its
    active_parameter_count)."""
    spec = model_spec(args.family)
    unused = 0
    if spec.active_parameter_count is not None:
        unused = spec.parameter_count(args) - spec.active_parameter_count(args)
    return non_embedding_parameters(args) - unused


def forward_flops_per_token(
    matmul_parameters: float, layers: int, attention_width: float, seq_len: int
) -> float:
    """Forward FLOPs per token: 2 per matmul parameter + 4·T·(H·Q) per layer for attention's
    two matmuls (Q·Kᵀ and the weighted sum of V) over T = seq_len positions."""
    return 2.0 * matmul_parameters + 4.0 * layers * attention_width * seq_len


def training_flops_per_token(
    matmul_parameters: float, layers: int, attention_width: float, seq_len: int
) -> float:
    """Training FLOPs per token, PaLM's 6N + 12·L·H·Q·T: the forward and a backward of twice it.

    For any part of the model: the whole one (flops_per_token) or the layers and the matmul
    parameters one GPU holds (the planner, with attention_width = H·Q / tp)."""
    return 3.0 * forward_flops_per_token(matmul_parameters, layers, attention_width, seq_len)


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token of the whole model: 6N (matmuls, N the active non-embedding
    parameters) + 12·L·H·Q·T (attention)."""
    return training_flops_per_token(
        active_non_embedding_parameters(args),
        args.n_layers,
        args.n_heads * args.head_dim,
        seq_len,
    )


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    """hardware.peak_tflops if set, else the known GPU's bf16 peak; None when unknown (CPU)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key in name), None)
