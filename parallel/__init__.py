"""Applying parallelism to a plain model: mesh, TP plan, pipeline split and schedules, DP
wrapping, initialization, clipping, loss.

Rule: parallel/ imports models/ and torch, never launcher/ (not even for type hints); every
function takes explicit parts (a DeviceMesh, modules, an optimizer), never a config object.
Sub-packages build on it: pipeline/ (schedules, orders, split, runtime), checkpoint/
(distributed checkpoint I/O) and plan/ (cost model); tests/test_import_rules.py holds who may
import whom among them.
"""
