"""What `python -m launcher.bench` measures: overhead over a bare loop, pipeline bubbles, and
checkpoint I/O against raw disk speed, each side by side in one run (see BENCHMARKS.md).
"""
