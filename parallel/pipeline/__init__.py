"""Pipeline parallelism, whole: the schedule registry and its resolved PipelineLayout
(registry.py), tridist's zero-bubble orders (orders.py, list_schedule.py), building stages and
torch's schedules (runtime.py), per-stage costs and the replay of an order at them (costs.py,
simulate.py), the balanced stage split (split.py), searching an order at measured costs
(tuning.py) and recording a step's actions (timeline.py).

Rule: imports torch, models/ and parallel/'s building blocks only, never parallel/plan/ (the
cost model imports this package, not the reverse), parallelize.py or launcher/; takes a
PipelineLayout, never a schedule's name past `pipeline_layout`.
"""
