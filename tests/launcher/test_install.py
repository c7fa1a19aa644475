"""A non-editable install finds its Hydra configs (conf/ ships as package data)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_non_editable_install_composes_the_default_config(tmp_path: Path) -> None:
    target, source = tmp_path / "site", tmp_path / "src"
    # from a copy: setuptools builds in the source tree (build/, *.egg-info), never in the repo's
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "build", "*.egg-info", "outputs", "multirun", "__pycache__"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    code = (
        "import launcher.run.compose as t\n"
        "cfg = t.compose_config(['model=llama3_8b'])\n"
        "print(t.__file__, cfg.model.dim)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    ).stdout
    installed_file, dim = out.split()
    assert installed_file.startswith(str(target)) and dim == "4096"
