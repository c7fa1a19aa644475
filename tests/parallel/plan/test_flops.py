"""parallel.plan.flops: PaLM's FLOPs per token from the real parameter count; peaks by GPU name."""

import pytest
import torch

from models.llama import ModelArgs, Transformer
from parallel.plan.flops import flops_per_token, peak_tflops


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_counts_the_real_model(tied: bool) -> None:
    args = ModelArgs(
        dim=64,
        n_layers=3,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=300,
        multiple_of=32,
        tie_embeddings=tied,
    )
    model = Transformer(args)  # a real one, on the CPU
    n = sum(p.numel() for p in model.parameters())
    if not tied:  # the embedding is a lookup; tied, the same matrix is the output head's matmul
        n -= model.tok_embeddings.weight.numel()
    seq = 48
    assert flops_per_token(args, seq) == 6 * n + 12 * 3 * 8 * (64 // 8) * seq


def test_peak_comes_from_the_config_or_the_gpu_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert peak_tflops(None, torch.device("cpu")) is None
    assert peak_tflops(2.5, torch.device("cpu")) == 2.5
    gpu = torch.device("cuda", 0)
    for name, peak in [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H200", 989.0),
        ("Some New GPU", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_tflops(None, gpu) == peak, name
    assert peak_tflops(100.0, gpu) == 100.0  # the config wins


def test_moe_flops_per_token_count_the_active_parameters() -> None:
    from launcher.run.compose import compose_config
    from models.registry import model_spec

    args = compose_config(["model=qwen3_moe_debug"]).model
    model = model_spec(args.family).build(args)  # a real one, on the CPU
    n = sum(p.numel() for p in model.parameters()) - model.tok_embeddings.weight.numel()
    # a token goes through 2 of the 8 experts of each of the 4 layers, each 3 x 64 x 32
    unused = 4 * (8 - 2) * 3 * 64 * 32
    seq = 48
    attention = 12 * 4 * 4 * 32 * seq  # 12 L H Q T: 4 heads of width 32
    assert flops_per_token(args, seq) == 6 * (n - unused) + attention
