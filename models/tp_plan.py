"""How the Llama model shards under tensor parallelism, as data: module path -> style name.

parallel/tensor_parallel.py maps the names to torch's ParallelStyle objects; keeping the plan
here (as plain strings) lets the model's author own it without importing any distributed code.
"""


def llama_tp_plan(sequence_parallel: bool = False) -> dict[str, str]:
    """The Llama TP plan; with sequence parallelism the residual stream is split by sequence.

    Without it the hidden state between blocks is replicated across tp and each block ends in
    an all-reduce. With it (Megatron-style) the residual stream and the norms run on a 1/tp
    slice of the sequence: each block starts with an all-gather and ends in a reduce-scatter.
    """
    sp = sequence_parallel
    plan = {
        # rows = vocabulary split across tp; partial sums all-reduced, or reduce-scattered by sequence
        "tok_embeddings": "vocab_parallel_embedding_to_sequence_shards" if sp else "vocab_parallel_embedding",
        "layers.*.attention.wq": "colwise",  # heads split across tp
        "layers.*.attention.wk": "colwise",
        "layers.*.attention.wv": "colwise",
        "layers.*.attention.wo": "rowwise_to_sequence_shards" if sp else "rowwise",
        "layers.*.feed_forward.w1": "colwise",
        "layers.*.feed_forward.w3": "colwise",
        "layers.*.feed_forward.w2": "rowwise_to_sequence_shards" if sp else "rowwise",
        # logits stay sharded by vocabulary into the loss
        "output": "colwise_vocab_logits_from_sequence_shards" if sp else "colwise_vocab_logits",
    }
    if sp:
        plan |= {
            "layers.*.attention_norm": "sequence_parallel",  # norm on this rank's sequence slice
            "layers.*.attention": "gather_sequence_for_attention",  # attention needs every position
            "layers.*.ffn_norm": "sequence_parallel",
            "layers.*.feed_forward": "gather_sequence",
            "norm": "sequence_parallel",
        }
    return plan
