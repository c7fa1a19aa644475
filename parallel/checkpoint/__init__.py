"""Distributed checkpoint I/O: per-rank safetensors in torch.distributed.checkpoint's layout, an
atomic commit with a CRC-checked manifest, loading into any layout, and Hugging Face export.

    format.py      names on disk, finding checkpoints, the manifest and its versions
    state.py       model/optimizer tensors by full-model name, RNG; CheckpointError
    save.py        save_checkpoint (and the snapshot/write steps async saving reuses)
    shards.py      one part written: DCP's plan of who writes what, each file checked whole
    stream.py      one safetensors file streamed from the tensors' memory, CRC32 on the way
    commit.py      rank 0's manifest, commit, `latest` and rotation, in that order
    storage.py     the one seam for file operations: Storage, and the local file system's
    backends.py    storage_for: which Storage a location (a path, an fsspec URL) uses
    fsspec_storage.py  URLs through fsspec: commit by manifest, a safetensors reader for DCP
    preflight.py   before training: every rank can write the root; room for checkpoints
    async_save.py  AsyncCheckpointer
    load.py        load_checkpoint
    hf_export.py   export_to_hf

Rule: takes explicit parts (model chunks, an optimizer, a mapping of objects with
state_dict()/load_state_dict()), never a Trainer or a Config; imports nothing of launcher/.
"""
