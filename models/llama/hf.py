"""The Hugging Face Llama layout: names, the rotary permutation of q/k, config.json, and I/O.

tridist's attention rotates adjacent pairs (Meta's layout); Hugging Face's `LlamaForCausalLM`
rotates the two halves of each head, so q and k rows are permuted on the way out and back.
Weights are read and written with safetensors only (no pickle).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from models.llama.model import ModelArgs

INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFFormatError(ValueError):
    """A Hugging Face directory or tensor that does not fit; the message names the file."""


_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")


def hf_name(name: str) -> str:
    """The Hugging Face name of tridist parameter `name` (`layers.3.attention.wq.weight` ->
    `model.layers.3.self_attn.q_proj.weight`)."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _LAYER.fullmatch(name)
    if match is None or match.group(2) not in _PER_LAYER:
        raise HFFormatError(f"tensor {name!r} has no Hugging Face Llama counterpart")
    return f"model.layers.{match.group(1)}.{_PER_LAYER[match.group(2)]}.weight"


def _heads_of(name: str, args: ModelArgs) -> int | None:
    """Heads whose rows are rotary-permuted in this tensor (q: n_heads, k: n_kv_heads)."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.kv_heads
    return None


def to_hf_tensor(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """tridist layout -> Hugging Face layout (q/k rows: adjacent pairs -> rotate-half halves)."""
    heads = _heads_of(name, args)
    if heads is None:
        return tensor
    rows, cols = tensor.shape
    return tensor.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf_tensor(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Hugging Face layout -> tridist layout (the inverse of to_hf_tensor)."""
    heads = _heads_of(name, args)
    if heads is None:
        return tensor
    rows, cols = tensor.shape
    return tensor.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for `LlamaForCausalLM` (rope written in both the 4.x and the 5.x form)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling:
        rope.update(
            rope_type="llama3",
            factor=args.rope_scale_factor,
            low_freq_factor=args.rope_low_freq_factor,
            high_freq_factor=args.rope_high_freq_factor,
            original_max_position_embeddings=args.rope_original_max_seq_len,
        )
    legacy = {k: v for k, v in rope.items() if k != "rope_theta"} if args.rope_scaling else None
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "rope_theta": args.rope_theta,
        "rope_scaling": legacy,
        "rope_parameters": rope,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def check_hf_config(config: dict[str, Any], args: ModelArgs, where: Path) -> None:
    """Refuse a Hugging Face checkpoint whose shape differs from the configured model."""
    expected = {
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab_size,
        "intermediate_size": args.ffn_hidden_dim,
    }
    wrong = [
        f"{k}={config.get(k, config.get('num_attention_heads') if k == 'num_key_value_heads' else None)} "
        f"(model needs {v})"
        for k, v in expected.items()
        if config.get(k, config.get("num_attention_heads") if k == "num_key_value_heads" else None)
        != v
    ]
    if wrong:
        raise HFFormatError(
            f"{where}: this Hugging Face model does not match the configured "
            f"model: {', '.join(wrong)}; pick the matching model flavor"
        )


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or an HFFormatError naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise HFFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise HFFormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _inside(directory: Path, name: str, listed_in: str) -> Path:
    """directory/name, refused unless it stays inside directory (no `..`, no absolute path)."""
    path = (directory / name).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise HFFormatError(f"{directory / listed_in}: file {name!r} lies outside {directory}")
    return path


class HFLlamaWeights:
    """Full tridist-layout tensors read by name from a Hugging Face Llama directory."""

    def __init__(self, directory: Path, args: ModelArgs) -> None:
        self.directory, self.args = Path(directory), args
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise HFFormatError(
                f"{config_path}: missing; model.init_from must be a Hugging Face Llama directory"
            )
        check_hf_config(_read_json_object(config_path), args, config_path)
        if (self.directory / INDEX).is_file():
            weight_map = _read_json_object(self.directory / INDEX).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(f, str) for k, f in weight_map.items()
            ):
                raise HFFormatError(
                    f"{self.directory / INDEX}: no 'weight_map' of tensor name -> file name"
                )
            self._file_of = {k: _inside(self.directory, f, INDEX) for k, f in weight_map.items()}
        elif (self.directory / SINGLE_FILE).is_file():
            try:
                with safe_open(self.directory / SINGLE_FILE, "pt") as f:
                    self._file_of = {k: self.directory / SINGLE_FILE for k in f.keys()}
            except Exception as err:  # safetensors raises its own types for bad files
                raise HFFormatError(
                    f"{self.directory / SINGLE_FILE}: not a safetensors file ({err})"
                ) from None
        else:
            raise HFFormatError(f"{self.directory}: neither {SINGLE_FILE} nor {INDEX}")

    def __call__(self, name: str, shape: torch.Size) -> torch.Tensor:
        """The full value of tridist parameter `name`, checked against `shape`."""
        key = (
            "model.embed_tokens.weight"
            if name == "output.weight" and self.args.tie_embeddings
            else hf_name(name)
        )
        if key not in self._file_of:
            raise HFFormatError(f"{self.directory}: tensor {key!r} (for {name}) is missing")
        path = self._file_of[key]
        try:
            with safe_open(path, "pt") as f:
                tensor = f.get_tensor(key)
        except Exception as err:  # safetensors raises its own types for bad files
            raise HFFormatError(f"{path}: cannot read tensor {key!r}: {err}") from None
        if tuple(tensor.shape) != tuple(shape):
            raise HFFormatError(
                f"{path}: tensor {key!r} has shape {list(tensor.shape)}, the "
                f"model needs {list(shape)} for {name}"
            )
        return from_hf_tensor(name, tensor.float(), self.args)
