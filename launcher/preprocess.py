"""`python -m launcher.preprocess`: corpus files -> a Megatron `.bin/.idx` pair for data=indexed.

    python -m launcher.preprocess --input corpus/ --output-prefix data/web \\
        [--text-key text] [--tokenizer tokenizer.json] [--workers 4] [--eos-id N]

Bad input is one line `config error: <option>=<value>: <fix>` and exit code 2; the output pair
appears only complete (`.idx` renamed into place last).
"""

from __future__ import annotations

import argparse
import sys

from data.preprocess import PreprocessError, preprocess
from launcher.config import ConfigError
from launcher.errors import print_config_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m launcher.preprocess", description=__doc__)
    p.add_argument(
        "--input",
        required=True,
        help="a .jsonl/.jsonl.gz/.jsonl.zst/.parquet file, a folder of them, or a datasets save_to_disk folder",
    )
    p.add_argument(
        "--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json"
    )
    p.add_argument("--text-key", default="text", help="the field or column holding each document")
    p.add_argument(
        "--tokenizer", default=None, help="a Hugging Face tokenizer.json (default: bytes)"
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument(
        "--eos-id", type=int, default=None, help="end-of-document id (default: the tokenizer's)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run preprocessing; 0 on success, 2 on bad input."""
    args = parse_args(argv)
    if args.workers < 1:
        return print_config_error(ConfigError("--workers", args.workers, "use 1 or more"))
    try:
        preprocess(
            args.input,
            args.output_prefix,
            args.text_key,
            args.tokenizer,
            args.workers,
            args.eos_id,
            progress=lambda line: print(f"preprocess: {line}", file=sys.stderr, flush=True),
        )
    except PreprocessError as err:
        return print_config_error(ConfigError(err.option, err.value, err.fix))
    print(f"wrote {args.output_prefix}.bin and {args.output_prefix}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
