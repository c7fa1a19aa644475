"""Seeing what a run does: per-rank phase times and straggler scores, c10d operations counted per
process group, a hang watchdog, the profiler. Takes explicit parts (a mesh, a store, a folder);
never imports launcher/, starts no process group, and adds no host-device sync to a step."""
