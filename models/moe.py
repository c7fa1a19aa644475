"""A Mixture-of-Experts feed-forward: a router sends each token to its top-k of n_experts SwiGLU
experts, dropless (every token reaches every expert it picked), computed as grouped matmuls.

Plain single-device PyTorch. The step between sorting tokens by expert and running the experts
is a parameter-free submodule, `dispatch`, which expert parallelism (parallel/expert_parallel.py)
swaps for one that sends tokens to the ranks holding their experts, as context parallelism
swaps attention's `core`.

The router's auxiliary losses (a sequence-wise load-balancing loss, DeepSeek-V3's, and ST-MoE's
z-loss) are not part of the returned value: their gradient is injected in backward (as
Megatron-Core's MoEAuxLossAutoScaler does), so they work unchanged under pipelining, where only
the last stage sees the loss. Being means over sequences and tokens, they are the same whether
a batch is split into microbatches or data-parallel ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.args import ModelArgs
from models.llama.model import FeedForward


def _aligned(*tensors: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these: one dtype, every row 16-byte aligned."""
    dtype = tensors[0].dtype
    return all(t.dtype == dtype and (t.shape[-1] * t.element_size()) % 16 == 0 for t in tensors)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x [n, in] grouped by expert (counts [E] rows each, in order) times their expert's
    weight [E, out, in] transposed -> [n, out]. One grouped matmul (offsets stay on the device);
    a loop over experts (one host read of the counts) where the kernel refuses the shapes."""
    w = weight.transpose(-2, -1)
    if hasattr(torch, "_grouped_mm") and _aligned(x, weight, w):
        offsets = counts.cumsum(0).to(torch.int32)
        return _ContiguousGradient.apply(torch._grouped_mm(x, w, offs=offsets))
    parts = x.split(counts.tolist())
    return torch.cat([part @ w[e] for e, part in enumerate(parts)])


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose incoming gradient is made contiguous (the CPU grouped-matmul backward
    refuses an expanded one, e.g. the gradient of a sum)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_swiglu(
    x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> torch.Tensor:
    """Each expert's SwiGLU, w2(silu(w1 x) * w3 x), over its group of rows of x."""
    hidden = F.silu(grouped_linear(x, w1, counts)) * grouped_linear(x, w3, counts)
    return grouped_linear(hidden, w2, counts)


class GroupedExperts(nn.Module):
    """n_experts SwiGLU experts as three stacked weights, [E, hidden, dim] and [E, dim, hidden]."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [n, dim] sorted by expert, counts [E] rows per expert -> [n, dim]."""
        return grouped_swiglu(x, counts, self.w1, self.w2, self.w3)


class LocalDispatch(nn.Module):
    """Every expert is here: the sorted tokens go straight to them."""

    def forward(
        self, x: torch.Tensor, counts: torch.Tensor, experts: GroupedExperts
    ) -> torch.Tensor:
        """x [n, dim] sorted by expert, counts [E] -> the experts' outputs, in the same order."""
        return experts(x, counts)


class _AuxLoss(torch.autograd.Function):
    """Returns x unchanged; in backward, gives `loss` the gradient `scale` (its weight in the
    objective), so the auxiliary loss trains the router without being added to the output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


class MoE(nn.Module):
    """Router, routed experts, optional shared expert; also keeps its load for the metrics."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_experts, self.top_k = args.n_experts, args.experts_per_token
        self.norm_topk_prob = args.norm_topk_prob
        self.aux_coeff, self.z_coeff = args.moe_aux_loss_coeff, args.moe_z_loss_coeff
        # the weight of this module's auxiliary losses' gradient: 1 when the loss's gradient is
        # divided after backward (pipelining), 1/microbatches when each microbatch's loss is
        self.aux_loss_scale = 1.0
        self.router = nn.Linear(args.dim, args.n_experts, bias=False)
        self.experts = GroupedExperts(args.n_experts, args.dim, args.expert_hidden_dim)
        self.dispatch: nn.Module = LocalDispatch()
        self.shared_expert: nn.Module | None = None
        if args.shared_expert_ffn_dim > 0:
            self.shared_expert = FeedForward(args, hidden=args.shared_expert_ffn_dim)
        # tokens routed to each expert and the auxiliary losses since the last read (no sync)
        self.load: torch.Tensor | None = None
        self.aux_sum: torch.Tensor | None = None
        self.forwards = 0

    def route(
        self, tokens: torch.Tensor, b: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(expert ids [n, k], weights [n, k], auxiliary loss) of tokens [n, dim] of b sequences."""
        logits = self.router(tokens).float()
        probs = logits.softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        # sequence-wise balance: E/(k s) * tokens of the sequence sent to e, times the mean
        # probability of e over the sequence, summed over experts; mean over sequences
        s = tokens.shape[0] // b
        picked = torch.zeros(b, self.n_experts, device=tokens.device)
        picked.scatter_add_(
            1, chosen.view(b, -1), torch.ones_like(chosen, dtype=picked.dtype).view(b, -1)
        )
        balance = (picked * self.n_experts / (self.top_k * s) * probs.view(b, s, -1).mean(1)).sum(
            -1
        )
        aux = self.aux_coeff * balance.mean()
        if self.z_coeff:
            aux = aux + self.z_coeff * torch.logsumexp(logits, -1).square().mean()
        return chosen, weights, aux

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, dim] -> [b, s, dim]: the weighted sum of each token's k experts (+ shared)."""
        b, s, dim = x.shape
        tokens = x.reshape(-1, dim)
        chosen, weights, aux = self.route(tokens, b)
        flat = chosen.flatten()
        order = flat.argsort(stable=True)  # token-expert pairs grouped by expert
        # rows per expert (bincount would read its size off the device: a sync on CUDA)
        counts = torch.zeros(self.n_experts, dtype=flat.dtype, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        routed = self.dispatch(tokens[order // self.top_k], counts, self.experts)
        per_choice = routed[order.argsort()].view(-1, self.top_k, dim)
        out = (per_choice * weights.unsqueeze(-1).to(per_choice.dtype)).sum(1)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        if torch.is_grad_enabled():  # training forwards only (not evaluation's)
            self._keep(counts, aux)
            if self.aux_coeff or self.z_coeff:
                out = _AuxLoss.apply(out, aux, self.aux_loss_scale)
        return out.view(b, s, dim)

    @torch.no_grad()
    def _keep(self, counts: torch.Tensor, aux: torch.Tensor) -> None:
        if self.load is None or self.aux_sum is None:
            self.load = torch.zeros_like(counts)
            self.aux_sum = torch.zeros((), device=counts.device)
        self.load += counts
        self.aux_sum += aux.detach()
        self.forwards += 1


def moe_modules(model: nn.Module) -> list[MoE]:
    """The MoE feed-forwards of a model (or of a pipeline chunk), in layer order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """The gradient weight of every MoE auxiliary loss in `model` (1/microbatches where each
    microbatch's loss is divided before its backward, 1 where gradients are divided after)."""
    for m in moe_modules(model):
        m.aux_loss_scale = scale
