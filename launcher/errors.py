"""How an entry point reports a bad setting: one line on rank 0, exit code 2."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from launcher.config import ConfigError


def exit_config_error(err: ConfigError) -> NoReturn:
    """Print the error on one line (rank 0 only, so torchrun jobs say it once) and exit 2."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(str(err).replace("\n", " "), file=sys.stderr, flush=True)
    sys.exit(2)
