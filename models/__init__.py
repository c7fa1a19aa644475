"""Plain single-device model code (Llama) and what maps it to other layouts (Hugging Face names).

Rule: imports torch and safetensors only, never distributed code, the parallelism package or
the launcher (tests/test_import_rules.py enforces it). Parallelism is applied from outside.
"""
