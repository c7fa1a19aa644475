"""The cost model: parameters, memory, communication, FLOPs and step time of a layout, and the
per-part costs the pipeline split balances (parts.py). Schedules, their replay and the split
search live in parallel/pipeline/, which this package imports and never the reverse.

Rule: arithmetic on the meta device only; nothing here starts a process group or allocates
real tensors, so a plan for 405B on 2048 GPUs runs in seconds on a laptop. It takes explicit
parts (a ModelArgs, a Layout, a Cluster: parallel/plan/layout.py), never a launcher config.
"""
