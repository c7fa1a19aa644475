"""Entry points users type (`python -m launcher.train|plan|convert|plot|bench`): thin CLIs over
the run library (launcher/run/), with the typed config schema and its validation.

Rule: config is validated here, once, before any process group starts; launcher/ may import
every other package, and nothing outside launcher/ imports it.
"""
