"""`python -m launcher.convert to-hf CKPT OUT`: a tridist checkpoint as a Hugging Face model of its family.

The other direction needs no conversion step: `python -m launcher.train model.init_from=HF_DIR`
starts training from a Hugging Face directory of the configured family in any (dp, pp, tp) layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from parallel.checkpoint.format import find_checkpoint
from parallel.checkpoint.hf_export import DEFAULT_SHARD_BYTES, export_to_hf
from parallel.checkpoint.state import CheckpointError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and convert; exits 1 with one line on a bad checkpoint."""
    parser = argparse.ArgumentParser(prog="python -m launcher.convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser(
        "to-hf", help="write config.json + safetensors for the family's *ForCausalLM"
    )
    to_hf.add_argument(
        "checkpoint",
        type=Path,
        help="a checkpoint (step-XXXXXXXX) or a checkpoint folder (its newest)",
    )
    to_hf.add_argument("out", type=Path)
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as saved")
    to_hf.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 2**30)
    args = parser.parse_args(argv)
    try:
        if str(args.checkpoint) in ("auto", "none") and not args.checkpoint.exists():
            # train.resume's keywords mean nothing here: there is no run to take a folder from
            raise CheckpointError(
                f"{args.checkpoint!s} is a train.resume keyword; convert needs "
                "a checkpoint (step-XXXXXXXX) or a checkpoint folder"
            )
        checkpoint = find_checkpoint(args.checkpoint)
        files = export_to_hf(
            checkpoint, args.out, DTYPES.get(args.dtype), int(args.max_shard_gb * 2**30)
        )
    except CheckpointError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {args.out}/config.json and {len(files)} safetensors file(s) from {checkpoint}")


if __name__ == "__main__":
    main()
