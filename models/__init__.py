"""Plain single-device model code (Llama) and what maps it to other layouts (Hugging Face names).

Rule: imports torch and safetensors only; never torch.distributed, parallel/ or launcher/
(tests/test_import_rules.py enforces it). Parallelism is applied from outside.
"""
