#!/usr/bin/env python3
"""Set-up-and-run helper behind the README's two Quick start commands.

    python3 dev.py demo [ARGS...]   # create/reuse .venv, install, run `diffim-dask demo ARGS`
    python3 dev.py test [ARGS...]   # create/reuse .venv, install with test extras, run pytest ARGS

Needs only Python >= 3.11 with the standard ``venv`` module and network access
to PyPI for the first install. The virtual environment lives in ``.venv`` next
to this file (``DIFFIM_DASK_VENV`` overrides); it is reinstalled only when
``pyproject.toml`` changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("DIFFIM_DASK_VENV", ROOT / ".venv"))
EXTRAS = {"demo": "plot", "test": "test,plot"}


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _ensure_env(extras: str) -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"diffim_dask needs Python >= 3.11; this is {sys.version.split()[0]}")
    if not _python().exists():
        print(f"[dev] creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / ".diffim-dask-installed"
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"[dev] installing diffim-dask[{extras}] into {VENV} (first run takes a few minutes)",
          flush=True)
    subprocess.run([str(_python()), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
                   check=True)
    subprocess.run([str(_python()), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[{extras}]"],
                   check=True)
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    # `test` installs a superset of `demo`, so a test env serves the demo too.
    _ensure_env(EXTRAS[command] if command == "test" else EXTRAS["test"])
    if command == "demo":
        cmd = [str(_python()), "-m", "diffim_dask.cli", "demo", *rest]
    else:
        cmd = [str(_python()), "-m", "pytest", *rest]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
