"""Hugging Face layouts of Llama-style families: names, the rotary permutation, config.json, I/O.

tridist's attention rotates adjacent pairs (Meta's layout); Hugging Face's `LlamaForCausalLM`
(and Qwen3's) rotates the two halves of each head, so q and k rows (and per-head QK-norm
weights) are permuted on the way out and back. Each family names its layout in its spec
(models/<family>/); weights are read and written with safetensors only (no pickle).

A Mixture-of-Experts family stacks its experts in one tensor per projection ([E, out, in]);
Hugging Face's files hold one tensor per expert, which `Stacked` names: import stacks them,
export splits them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from models.args import ModelArgs

INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFFormatError(ValueError):
    """A Hugging Face directory or tensor that does not fit; the message names the file."""


@dataclass(frozen=True)
class Stacked:
    """A block parameter [E, ...] that Hugging Face keeps as one tensor per expert (the hub's
    files, what `save_pretrained` writes), or whole inside transformers' in-memory fused tensor
    (what `save_pretrained(save_original_format=False)` writes), read on import only."""

    per_expert: str  # the name in a block, {e} for the expert: "mlp.experts.{e}.gate_proj.weight"
    fused: str  # transformers' [E, parts * out, in] tensor in a block: "mlp.experts.gate_up_proj"
    part: int = 0  # which of the fused tensor's equal chunks along dim 1 this parameter is
    parts: int = 1

    def names(self, layer: str, experts: int) -> list[str]:
        """The Hugging Face names of the experts' tensors of block `layer`, in expert order."""
        return [f"model.layers.{layer}.{self.per_expert.format(e=e)}" for e in range(experts)]


def _dense_config(args: ModelArgs) -> dict[str, Any]:
    """A dense family's feed-forward width (config.json's intermediate_size)."""
    return {"intermediate_size": args.ffn_hidden_dim}


@dataclass(frozen=True, kw_only=True)
class HFLayout:
    """A family's Hugging Face model: its class, tensor names, rotary rows and config.json."""

    architecture: str  # config.json's "architectures" entry, e.g. LlamaForCausalLM
    model_type: str  # config.json's "model_type", e.g. llama
    per_layer: Mapping[str, str]  # module path inside a block -> the Hugging Face module
    # module paths in a block whose output rows are heads rotated by RoPE (q: n_heads, k:
    # n_kv_heads), and per-head vectors (QK-norm weights) rotated the same way
    rotary_rows: Mapping[str, str] = field(
        default_factory=lambda: {"attention.wq": "q", "attention.wk": "k"}
    )
    rotary_vectors: tuple[str, ...] = ()
    config_extra: Mapping[str, Any] = field(default_factory=dict)  # family-only config.json keys
    # parameter path in a block -> its per-expert Hugging Face tensors (an MoE's stacked experts)
    stacked: Mapping[str, Stacked] = field(default_factory=dict)
    # family config.json keys from the model's fields: the first are its shape, written and
    # compared on import; the second are written only (training settings, unused widths)
    config_compared: Callable[[ModelArgs], dict[str, Any]] = _dense_config
    config_written: Callable[[ModelArgs], dict[str, Any]] = lambda args: {}
    # transformers' value of a compared key that a config.json omits (or gives as null)
    config_defaults: Callable[[Mapping[str, Any]], dict[str, Any]] = lambda config: {}
    # ModelArgs fields the Hugging Face class has no place for (they must be 0) -> what it lacks
    unsupported: Mapping[str, str] = field(default_factory=dict)

    def hf_name(self, name: str) -> str:
        """The Hugging Face name of tridist parameter `name` (`layers.3.attention.wq.weight` ->
        `model.layers.3.self_attn.q_proj.weight`)."""
        if name in _TOP_LEVEL:
            return _TOP_LEVEL[name]
        match = _LAYER.fullmatch(name)
        if match is None or match.group(2) not in self.per_layer:
            raise HFFormatError(
                f"tensor {name!r} has no Hugging Face {self.architecture} counterpart"
            )
        return f"model.layers.{match.group(1)}.{self.per_layer[match.group(2)]}.weight"

    def stacked_of(self, name: str) -> tuple[str, Stacked] | None:
        """(block index, how Hugging Face holds it) of a stacked parameter `name`; None for a
        parameter with one Hugging Face tensor (hf_name's)."""
        match = _BLOCK_PARAMETER.fullmatch(name)
        if match is None or match.group(2) not in self.stacked:
            return None
        return match.group(1), self.stacked[match.group(2)]

    def to_hf_tensors(
        self, name: str, tensor: torch.Tensor, args: ModelArgs
    ) -> dict[str, torch.Tensor]:
        """Hugging Face name -> tensor of the full tridist parameter `name`: one tensor, or one
        per expert of a stacked parameter."""
        found = self.stacked_of(name)
        if found is None:
            return {self.hf_name(name): self.to_hf_tensor(name, tensor, args)}
        layer, stacked = found
        # copies: safetensors refuses to save tensors that share memory (slices of one stack)
        return dict(zip(stacked.names(layer, len(tensor)), (t.clone() for t in tensor.unbind(0))))

    def _heads_of(self, name: str, args: ModelArgs) -> int | None:
        """Heads whose rows are rotary-permuted in this tensor (q: n_heads, k: n_kv_heads; a
        per-head vector: one)."""
        match = _LAYER.fullmatch(name)
        module = match.group(2) if match else None
        if module in self.rotary_vectors:
            return 1
        kind = self.rotary_rows.get(module or "")
        return None if kind is None else args.n_heads if kind == "q" else args.kv_heads

    def to_hf_tensor(self, name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
        """tridist layout -> Hugging Face layout (q/k rows: adjacent pairs -> rotate-half halves)."""
        heads = self._heads_of(name, args)
        if heads is None:
            return tensor
        rows = tensor.shape[0]
        pairs = tensor.reshape(heads, rows // heads // 2, 2, -1)
        return pairs.transpose(1, 2).reshape(tensor.shape)

    def from_hf_tensor(self, name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
        """Hugging Face layout -> tridist layout (the inverse of to_hf_tensor)."""
        heads = self._heads_of(name, args)
        if heads is None:
            return tensor
        rows = tensor.shape[0]
        halves = tensor.reshape(heads, 2, rows // heads // 2, -1)
        return halves.transpose(1, 2).reshape(tensor.shape)

    def check_args(self, args: ModelArgs) -> None:
        """Refuse a model that the family's Hugging Face class cannot hold (a field it has no
        place for), naming the field."""
        for name, lacks in self.unsupported.items():
            if value := getattr(args, name):
                raise HFFormatError(
                    f"model.{name}={value}: Hugging Face's {self.architecture} has {lacks}; "
                    f"set model.{name}=0 for a model it can hold"
                )

    def config(self, args: ModelArgs, dtype: torch.dtype) -> dict[str, Any]:
        """config.json for the family's `*ForCausalLM` (rope written in both the 4.x and the 5.x
        form); HFFormatError for a model it cannot hold."""
        self.check_args(args)
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
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "vocab_size": args.vocab_size,
            **self.config_compared(args),
            **self.config_written(args),
            "rms_norm_eps": args.norm_eps,
            "max_position_embeddings": args.max_seq_len,
            "hidden_act": "silu",
            "tie_word_embeddings": args.tie_embeddings,
            "attention_bias": False,
            "rope_theta": args.rope_theta,
            "rope_scaling": legacy,
            "rope_parameters": rope,
            **self.config_extra,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }

    def check_directory(self, directory: str | Path, args: ModelArgs) -> None:
        """Refuse a Hugging Face directory without a config.json of this family and shape."""
        config_path = Path(directory) / "config.json"
        if not config_path.is_file():
            raise HFFormatError(
                f"{config_path}: missing; model.init_from must be a Hugging Face model directory"
            )
        self.check_config(_read_json_object(config_path), args, config_path)

    def check_config(self, config: dict[str, Any], args: ModelArgs, where: Path) -> None:
        """Refuse a Hugging Face checkpoint of another family or whose shape differs from the
        configured model (or a model the family's Hugging Face class cannot hold)."""
        kind = config.get("model_type")
        if kind != self.model_type:
            raise HFFormatError(
                f"{where}: a Hugging Face {kind!r} model, not {self.model_type!r}; set "
                f"model.family to its family (or pick a {kind} model flavor)"
            )
        self.check_args(args)
        heads = config.get("num_attention_heads")
        expected = {
            "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "vocab_size": args.vocab_size,
            **self.config_compared(args),
        }
        defaults = {
            "num_key_value_heads": heads,
            "head_dim": _default_head_dim(config),
            **self.config_defaults(config),
        }
        got = {k: defaults.get(k) if config.get(k) is None else config[k] for k in expected}
        wrong = [f"{k}={got[k]} (model needs {v})" for k, v in expected.items() if got[k] != v]
        if wrong:
            raise HFFormatError(
                f"{where}: this Hugging Face model does not match the configured "
                f"model: {', '.join(wrong)}; pick the matching model flavor"
            )


_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_BLOCK_PARAMETER = re.compile(r"layers\.(\d+)\.(.+)")


def _default_head_dim(config: dict[str, Any]) -> int | None:
    """head_dim as transformers reads it when config.json has none: hidden_size / heads."""
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


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


class HFWeights:
    """Full tridist-layout tensors read by name from a Hugging Face directory of `layout`."""

    def __init__(self, directory: Path, args: ModelArgs, layout: HFLayout) -> None:
        self.directory, self.args, self.layout = Path(directory), args, layout
        layout.check_directory(self.directory, args)
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
        stacked = self.layout.stacked_of(name)
        if stacked is not None:
            return self._stacked(name, shape, *stacked)
        key = (
            "model.embed_tokens.weight"
            if name == "output.weight" and self.args.tie_embeddings
            else self.layout.hf_name(name)
        )
        (tensor,) = self._read([key], name, shape)
        return self.layout.from_hf_tensor(name, tensor.float(), self.args)

    def _stacked(self, name: str, shape: torch.Size, layer: str, stacked: Stacked) -> torch.Tensor:
        """An expert stack [E, ...]: from the E per-expert tensors, or from the fused one where a
        folder has that instead."""
        keys = stacked.names(layer, shape[0])
        fused = f"model.layers.{layer}.{stacked.fused}"
        if fused in self._file_of and not all(k in self._file_of for k in keys):
            whole = torch.Size((shape[0], stacked.parts * shape[1], *shape[2:]))
            (tensor,) = self._read([fused], name, whole)
            return tensor.chunk(stacked.parts, dim=1)[stacked.part].float().contiguous()
        return torch.stack(self._read(keys, name, shape[1:])).float()

    def _read(self, keys: list[str], name: str, shape: torch.Size) -> list[torch.Tensor]:
        """Hugging Face tensors `keys` (each file opened once), each checked against `shape`."""
        missing = [k for k in keys if k not in self._file_of]
        if missing:
            raise HFFormatError(
                f"{self.directory}: tensor {missing[0]!r} (for {name}) is missing"
                + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
        tensors: dict[str, torch.Tensor] = {}
        for path in dict.fromkeys(self._file_of[k] for k in keys):
            in_file = [k for k in keys if self._file_of[k] == path]
            key = in_file[0]
            try:
                with safe_open(path, "pt") as f:
                    for key in in_file:
                        tensors[key] = f.get_tensor(key)
            except Exception as err:  # safetensors raises its own types for bad files
                raise HFFormatError(f"{path}: cannot read tensor {key!r}: {err}") from None
        for key, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(shape):
                raise HFFormatError(
                    f"{self._file_of[key]}: tensor {key!r} has shape {list(tensor.shape)}, the "
                    f"model needs {list(shape)} for {name}"
                )
        return [tensors[k] for k in keys]
