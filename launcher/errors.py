"""How an entry point reports a bad setting: one line on rank 0, exit code 2."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from launcher.config import ConfigError


def print_config_error(err: ConfigError) -> int:
    """Print the error on one line (rank 0 only, so torchrun jobs say it once); returns 2, the
    exit code of a refused setting."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(str(err).replace("\n", " "), file=sys.stderr, flush=True)
    return 2


def exit_config_error(err: ConfigError) -> NoReturn:
    """Print the error on one line and exit with code 2."""
    sys.exit(print_config_error(err))
