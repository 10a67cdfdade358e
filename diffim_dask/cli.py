"""Command-line interface: ``diffim-dask``.

Sub-commands
------------
demo       the built-in default: simulate a mini-survey on a local Dask cluster and summarise it
simulate   write a simulated survey (exposure stores, truth tables, manifest) of any size
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import DiffimError

__all__ = ["main", "build_parser"]


def _add_simulate_options(parser: argparse.ArgumentParser, *, visits: int, detectors: int,
                          size: int) -> None:
    parser.add_argument("--visits", type=int, default=visits, help="number of visits (default %(default)s)")
    parser.add_argument("--detectors", type=int, default=detectors,
                        help="detectors per visit (default %(default)s)")
    parser.add_argument("--size", type=int, default=size,
                        help="detector side in pixels (default %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="local Dask workers (processes, one thread each; default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output directory's simulated survey")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``diffim-dask``."""
    parser = argparse.ArgumentParser(
        prog="diffim-dask",
        description="Survey-scale difference image analysis on Dask.",
    )
    parser.add_argument("--version", action="version", version=f"diffim-dask {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="simulate a mini-survey on a local Dask cluster and summarise it",
        description="The built-in default run: simulate a mini-survey (template patches and "
                    "several visits x 2 detectors with injected transients) on a local Dask "
                    "cluster, write it under --out and print a summary.")
    demo.add_argument("--out", type=Path, default=Path("diffim-demo"),
                      help="output directory (default %(default)s)")
    _add_simulate_options(demo, visits=4, detectors=2, size=1024)

    simulate = sub.add_parser(
        "simulate", help="write a simulated survey (stores, truth, manifest)",
        description="Simulate a survey of any size and write science exposures and template "
                    "patches to Zarr stores, the truth tables to Parquet and a manifest.")
    simulate.add_argument("--out", type=Path, required=True, help="output directory")
    _add_simulate_options(simulate, visits=4, detectors=2, size=2048)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own messages at INFO; Dask's and others' only when something is wrong.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffim_dask").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command in ("demo", "simulate"):
            from .workflow.simulated_survey import run_simulate_command

            return run_simulate_command(args, demo=args.command == "demo")
    except DiffimError as exc:
        print(f"diffim-dask {args.command}: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
