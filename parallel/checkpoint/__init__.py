"""Distributed checkpoint I/O: per-rank safetensors through torch.distributed.checkpoint, an
atomic commit with a CRC-checked manifest, loading into any layout, and Hugging Face export.

Rule: takes explicit parts (model chunks, an optimizer, a mapping of objects with
state_dict()/load_state_dict()), never a Trainer or a Config; imports nothing of launcher/.
"""
