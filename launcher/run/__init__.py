"""The run library: build a training run from a validated Config and drive it (trainer loop,
checkpoint glue, metrics, progress, preemption, local worker groups).

Rule: imports config, parallel/, models/ and data/, never the entry-point modules
(launcher.train, plan, convert, plot, bench), so there is no import cycle.
"""
