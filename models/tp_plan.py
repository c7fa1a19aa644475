"""How the Llama model shards under tensor parallelism, as data: module path -> style name.

parallel/tensor_parallel.py maps the names to torch's ParallelStyle objects; keeping the plan
here (as plain strings) lets the model's author own it without importing torch.distributed.
"""

LLAMA_TP_PLAN: dict[str, str] = {
    "tok_embeddings": "vocab_parallel_embedding",  # rows = vocabulary split across tp
    "layers.*.attention.wq": "colwise",  # heads split across tp
    "layers.*.attention.wk": "colwise",
    "layers.*.attention.wv": "colwise",
    "layers.*.attention.wo": "rowwise",  # partial sums all-reduced
    "layers.*.feed_forward.w1": "colwise",
    "layers.*.feed_forward.w3": "colwise",
    "layers.*.feed_forward.w2": "rowwise",
    "output": "colwise_vocab_logits",  # logits stay sharded by vocabulary into the loss
}
