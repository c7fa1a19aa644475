"""The shape every family's model has, which is all that parallel/ relies on.

Blocks live in an nn.ModuleDict keyed by layer index; the embedding, the final norm and the
output head may be None on pipeline stages that do not own them (the forward skips what is
missing), so parameter names stay the same however the model is split. A family's model
subclasses Decoder and sets these parts in its __init__ (models/llama/model.py). Each block's
`attention` takes (x, cos, sin) and keeps its softmax in a parameter-free submodule `core`,
which context parallelism swaps.
"""

from __future__ import annotations

import torch
from torch import nn

from models.args import ModelArgs

# under tie_embeddings, the parameter that is the same matrix as another: copy -> the one kept
TIED_PARAMETERS = {"output.weight": "tok_embeddings.weight"}


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] boolean block-causal mask: a token sees the earlier tokens of its document."""
    s = doc_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal


def tied_name(fqn: str, args: ModelArgs) -> str:
    """The parameter whose value `fqn` shares under tied embeddings (`fqn` itself otherwise)."""
    return TIED_PARAMETERS.get(fqn, fqn) if args.tie_embeddings else fqn


class Decoder(nn.Module):
    """Embedding, blocks keyed by layer index, final norm, output head; any of them removable."""

    args: ModelArgs
    tok_embeddings: nn.Embedding | None
    layers: nn.ModuleDict
    norm: nn.Module | None
    output: nn.Linear | None

    def tie_weights(self) -> None:
        """Point the head at the embedding's weight again where this module holds both: moving
        off the meta device or sharding replaces the shared parameter by two."""
        if self.args.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight
