"""Distributed checkpoint I/O: per-rank safetensors through torch.distributed.checkpoint, an
atomic commit with a CRC-checked manifest, loading into any layout, and Hugging Face export.

    format.py      names on disk, finding checkpoints, the manifest and its versions
    state.py       model/optimizer tensors by full-model name, RNG; CheckpointError
    save.py        save_checkpoint (and the snapshot/write steps async saving reuses)
    shards.py      one DCP part written, each file checked whole (DCP's threads lose errors)
    commit.py      rank 0's manifest, rename, `latest` and rotation, in that order
    preflight.py   before training: every rank can write the root; room for checkpoints
    async_save.py  AsyncCheckpointer
    load.py        load_checkpoint
    hf_export.py   export_to_hf

Rule: takes explicit parts (model chunks, an optimizer, a mapping of objects with
state_dict()/load_state_dict()), never a Trainer or a Config; imports nothing of launcher/.
"""
