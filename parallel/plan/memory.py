"""Per-GPU memory of a layout: model state, and activations of the microbatches a pipeline
schedule keeps in flight (how many: parallel/pipeline/registry.py).

Assumptions (mixed precision as in ZeRO and Megatron, bf16 compute on GPUs):
- per parameter: a bf16 weight (2 B), an fp32 gradient accumulated over microbatches (4 B),
  fp32 master weight + Adam m and v (12 B);
- FSDP (dp_shard, dp > 1) shards all three by dp (dim 0, padded like FSDP2), plus its
  unsharded working set: under pipelining torch keeps a stage's weights and its accumulating
  gradients unsharded from the first forward to the last backward (no resharding between
  microbatches); without pipelining only the block in use and the one prefetched;
- activations in bf16, counted as what autograd keeps in torch 2.13 (checked on CPU against
  a measurement, tests/parallel/plan/test_memory.py), a Llama block keeps per token:
  two RMSNorms x 3h (input, normalized, output), attention 4h (q, k and v expanded to all
  heads by GQA's repeat, and SDPA's output: flash attention keeps no s x s matrix), SwiGLU 4f
  (w1 and w3 outputs, silu, their product). Korthikanti et al.'s GPT block is the same
  accounting with LayerNorm/GeLU/dropout instead (sbh(34 + 5as/h) bytes in fp16);
- CP divides every activation by cp (each GPU holds seq_len / cp tokens); all-gather CP keeps
  the whole sequence's K/V un-repeated (its attention op repeats GQA's heads again in backward)
  in place of the local expanded K/V (`cp_kv_buffer_elements`); the ring keeps only its own K/V
  and the log-sum-exp;
- TP divides what lies between a column-wise and a row-wise linear; sequence parallelism also
  divides the norms, but DTensor keeps the all-gathered norm output (h) for the linears;
- recompute `full` keeps each block's input, `selective` (parallel/activation_checkpoint.py)
  keeps the block input plus every matmul and SDPA output; both rebuild one block at a time in
  backward, which is added once;
- a Mixture-of-Experts feed-forward (models/moe.py) in place of SwiGLU keeps, per token of its
  input, k rows of each kind for its k token-expert pairs: the token's sorted copy (h), the
  expert's SwiGLU (4 f_e, as SwiGLU's 4f), the expert's output put back in token order (h)
  and the routing weight (1); a shared expert's SwiGLU (4 f_s); and its routing state in fp32
  and int64 whatever the activation dtype (`routing_bytes`). TP leaves it whole: every TP rank
  keeps all of it. Under `selective` it keeps only its plain matmuls' outputs (the router's
  logits, the shared expert's); the routed experts' grouped matmuls are not among the saved ops.
"""

from __future__ import annotations

from models.args import ModelArgs
from parallel.plan.layout import RankContext, is_moe

WEIGHT_BYTES = 2
GRAD_BYTES = 4
OPTIMIZER_BYTES = 12
ACTIVATION_BYTES = 2
LOGSOFTMAX_BYTES = 4  # the loss runs in fp32 and keeps its log-softmax
RUNTIME_RESERVED_BYTES = 3 * 2**30  # CUDA context, NCCL buffers, allocator fragmentation


def state_bytes(
    params: int, sharded: int, largest_block: int, *, fsdp: bool, pipelined: bool, microbatches: int
) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes on one GPU.

    `params` are this rank's elements before DP, `sharded` after FSDP sharding. FSDP also holds
    unsharded copies: every weight from first forward to last backward under pipelining (else
    the block in use and the one prefetched), and every gradient while they accumulate without
    syncing over several microbatches (else one block's, until its reduce-scatter).
    """
    if not fsdp:
        return WEIGHT_BYTES * params, GRAD_BYTES * params, OPTIMIZER_BYTES * params
    weights = params if pipelined else 2 * largest_block
    grads = params if pipelined or microbatches > 1 else largest_block
    return (
        WEIGHT_BYTES * (sharded + weights),
        GRAD_BYTES * (sharded + grads),
        OPTIMIZER_BYTES * sharded,
    )


def block_activation_elements(
    args: ModelArgs, tp: int, sequence_parallel: bool, recompute: str
) -> float:
    """Elements one block keeps for backward, per token of a microbatch, on one TP rank."""
    h, f = args.dim, args.ffn_hidden_dim
    kv = args.kv_heads * args.head_dim
    sp = tp if sequence_parallel else 1  # the residual stream is split by sequence under SP
    gathered = h if sequence_parallel else 0  # the all-gathered norm output the linears keep
    if recompute == "full":
        return h / sp
    moe = is_moe(args)
    if recompute == "selective":
        # block input; q, k, v, w1, w3 outputs (sharded); SDPA output; wo/w2 partial sums (full)
        q = args.n_heads * args.head_dim  # the width of q and of SDPA's output (Qwen3: != dim)
        if moe:  # its feed-forward's instead of w1, w3, w2
            return h / sp + (q + 2 * kv + q) / tp + h + moe_activation_elements(args, recompute)
        return h / sp + (q + 2 * kv + 2 * f + q) / tp + 2 * h
    if recompute != "none":
        raise ValueError(f"unknown recompute mode {recompute!r}; use none, full or selective")
    if moe:
        return 2 * (3 * h / sp + gathered) + 4 * h / tp + moe_activation_elements(args, recompute)
    return 2 * (3 * h / sp + gathered) + (4 * h + 4 * f) / tp


def moe_activation_elements(args: ModelArgs, recompute: str) -> float:
    """Elements (of the activation dtype) a MoE feed-forward keeps per token beyond its input
    (the norm's output, counted with the norms), on every TP rank; 0 under full recompute."""
    h, k, fe, fs = (
        args.dim,
        args.experts_per_token,
        args.expert_hidden_dim,
        args.shared_expert_ffn_dim,
    )
    if recompute == "full":
        return 0.0
    if recompute == "selective":
        # the router's logits; the shared expert's w1, w3 and w2 outputs
        return args.n_experts + (2 * fs + h if fs else 0)
    # per token-expert pair: sorted copy, w1 and w3 outputs, silu, product, output, weight
    return k * (2 * h + 4 * fe + 1) + 4 * fs


def routing_bytes(args: ModelArgs, recompute: str) -> float:
    """Bytes a block's MoE routing keeps per token whatever the activation dtype (0 for a dense
    block, and under recompute): fp32 router probabilities (E) for the softmax, the top-k
    weights and their sum (k + 1) for the renormalization, the z-loss's logits and log-sum-exp
    (E + 1), and int64 indices: the top-k choice and the two permutations (3k)."""
    if recompute != "none" or not is_moe(args):
        return 0.0
    e, k = args.n_experts, args.experts_per_token
    fp32 = e + (k + 1 if args.norm_topk_prob else 0) + (e + 1 if args.moe_z_loss_coeff else 0)
    return 4 * fp32 + 8 * 3 * k


def cp_kv_buffer_elements(args: ModelArgs, tp: int, cp: int, comm: str, recompute: str) -> float:
    """Elements one block keeps per local token under CP beyond block_activation_elements: the
    all-gather keeps the whole sequence's K/V un-repeated (cp·2·kv per local token) in place of
    the local K/V expanded to the query heads (2h) that block_activation_elements counts; the
    ring keeps its own K/V un-repeated and is counted as plain attention (an over-count of
    2·(h − kv)). Recompute drops them with the rest of the block."""
    if cp == 1 or comm == "ring" or recompute != "none":
        return 0.0
    return 2 * (cp * args.kv_heads * args.head_dim - args.n_heads * args.head_dim) / tp


def head_activation_bytes(
    args: ModelArgs,
    tp: int,
    sequence_parallel: bool,
    pipelined: bool,
    dtype_bytes: int = ACTIVATION_BYTES,
) -> float:
    """Bytes the final norm, the head and the loss keep per token (last stage only)."""
    h, vocab = args.dim, args.vocab_size
    sp = tp if sequence_parallel else 1
    norm = 3 * h / sp + (h if sequence_parallel else 0)
    # a pipeline stage keeps its output (the logits) until its backward; the loss its log-softmax
    logits = vocab / tp if pipelined else 0
    return dtype_bytes * (norm + logits) + LOGSOFTMAX_BYTES * vocab / tp


def activation_bytes(
    rank: RankContext, in_flight: float, dtype_bytes: int = ACTIVATION_BYTES
) -> float:
    """Peak activation bytes of one pipeline rank: `in_flight` microbatches of its tokens
    (this GPU's: a 1/cp slice of each sequence) through its blocks (and the head if it has the
    last stage), plus the block being recomputed in backward."""
    args, tp, sp, rc = rank.args, rank.tp, rank.sequence_parallel, rank.recompute
    per_block = block_activation_elements(args, tp, sp, rc)
    per_block += cp_kv_buffer_elements(args, tp, rank.cp, rank.cp_comm, rc)
    per_token = dtype_bytes * rank.layers * per_block + rank.layers * routing_bytes(args, rc)
    if rank.last_stage:
        per_token += head_activation_bytes(args, tp, sp, rank.pipelined, dtype_bytes)
    rebuilt = rebuilt_block_bytes(args, rank.tokens, tp, sp, rc, dtype_bytes)
    return rank.tokens * in_flight * per_token + rebuilt * (rank.layers > 0)


def rebuilt_block_bytes(
    args: ModelArgs,
    tokens: int,
    tp: int,
    sequence_parallel: bool,
    recompute: str,
    dtype_bytes: int = ACTIVATION_BYTES,
) -> float:
    """Bytes of the one block that recompute rebuilds in full during backward (0 without it)."""
    if recompute == "none":
        return 0.0
    elements = block_activation_elements(args, tp, sequence_parallel, "none")
    return tokens * dtype_bytes * elements + tokens * routing_bytes(args, "none")
