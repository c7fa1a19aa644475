"""Test helpers: real gloo ranks (spawn), the real config and training entry, activation probes."""
