"""Command-line interface: ``diffim-dask``.

Sub-commands
------------
demo       the built-in default: simulate a mini-survey, run the default pipeline on a local Dask
           cluster and report completeness and false detections against the truth
subtract   difference two images (any format the readers accept) and detect DIA sources
run        the survey run: a pipeline over a visit manifest and a template store
simulate   write a simulated survey (exposure store, template store, truth, manifest) of any size
pipeline   write a pipeline file with every setting of every stage, documented
report     write the HTML quality report of a run directory
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
    from .workflow.pipeline import METHODS as METHODS_CHOICES

    parser = argparse.ArgumentParser(
        prog="diffim-dask",
        description="Survey-scale difference image analysis on Dask.",
    )
    parser.add_argument("--version", action="version", version=f"diffim-dask {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="simulate a mini-survey and run the default pipeline on it (local cluster)",
        description="The built-in default run: simulate a mini-survey (template patches and "
                    "several visits x 2 detectors with injected transients), run the default "
                    "pipeline on a local Dask cluster, and print completeness and false "
                    "detections against the truth.")
    demo.add_argument("--out", type=Path, default=Path("diffim-demo"),
                      help="output directory (default %(default)s)")
    demo.add_argument("--pipeline", default="alard-lupton",
                      help="pipeline YAML or built-in name (default %(default)s)")
    _add_simulate_options(demo, visits=4, detectors=2, size=1024)

    simulate = sub.add_parser(
        "simulate", help="write a simulated survey (stores, truth, manifest)",
        description="Simulate a survey of any size and write science exposures and template "
                    "patches to Zarr stores, the truth tables to Parquet and a manifest.")
    simulate.add_argument("--out", type=Path, required=True, help="output directory")
    _add_simulate_options(simulate, visits=4, detectors=2, size=2048)

    subtract = sub.add_parser(
        "subtract", help="difference two images and detect DIA sources",
        description="Difference SCIENCE minus TEMPLATE (FITS in any layout the readers accept). "
                    "With different WCSs the template is warped onto the science grid first; "
                    "with no WCS the two must share one pixel grid (same shape). Writes "
                    "difference.fits, score.fits (score methods) and diaSources.parquet under --out.")
    subtract.add_argument("science", help="science image (FITS)")
    subtract.add_argument("template", help="template image (FITS)")
    subtract.add_argument("--method", choices=METHODS_CHOICES, default=None,
                          help="subtraction method (default: the --config file's, else alard-lupton)")
    subtract.add_argument("--out", type=Path, default=Path("diffim-subtract"),
                          help="output directory (default %(default)s)")
    subtract.add_argument("--science-psf", help="PSF stamp (FITS) of the science image")
    subtract.add_argument("--template-psf", help="PSF stamp (FITS) of the template image")
    subtract.add_argument("--config", help="pipeline YAML with stage configs (see `diffim-dask pipeline`)")

    run = sub.add_parser(
        "run", help="run a pipeline over a visit manifest",
        description="The survey run: for every (visit, detector) of the manifest assemble the "
                    "template from the store, subtract, detect and measure; write difference "
                    "images, a Parquet DIA-source dataset partitioned by visit, per-unit records, "
                    "a run summary and provenance under --out. Exits non-zero if any unit failed.")
    run.add_argument("pipeline", help="pipeline YAML (or a built-in name: alard-lupton, "
                                      "alard-lupton-score, zogy)")
    run.add_argument("--manifest", required=True, help="visit manifest (YAML or CSV)")
    run.add_argument("--templates", required=True, help="template coadd store")
    run.add_argument("--out", required=True,
                     help="output directory, or an fsspec URL such as s3://bucket/run (each output "
                          "object is uploaded whole with one put; s3:// needs the [s3] extra)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--scheduler", help="address of a running Dask scheduler (default: "
                                           "$DASK_SCHEDULER_ADDRESS if set, else a local cluster)")
    where.add_argument("--workers", type=int, default=2, help="local cluster workers (default %(default)s)")
    run.add_argument("--resume", action="store_true", help="skip units already done or skipped")
    run.add_argument("--inject", type=int, default=None, metavar="N",
                     help="inject N point sources into every science image (overrides the "
                          "pipeline's injection.n_sources) and report completeness")

    report = sub.add_parser(
        "report", help="write the HTML quality report of a run",
        description="Write a self-contained HTML page for a run directory: unit summary, "
                    "D/sqrt(var) histogram, kernel-sum map, completeness, cutout gallery, timings.")
    from .qa.report import add_report_arguments

    add_report_arguments(report)

    pipeline = sub.add_parser(
        "pipeline", help="write a fully documented pipeline file",
        description="Print (or write) a pipeline YAML with every setting of every stage and its "
                    "documentation, for the given method.")
    pipeline.add_argument("--method", choices=METHODS_CHOICES, default="alard-lupton")
    pipeline.add_argument("--out", type=Path, help="file to write (default: print)")
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
        if args.command == "simulate":
            from .workflow.simulated_survey import run_simulate_command

            return run_simulate_command(args, demo=False)
        if args.command == "demo":
            from .workflow.demo import run_demo_command

            return run_demo_command(args)
        if args.command == "subtract":
            from .workflow.pair import run_subtract_command

            return run_subtract_command(args)
        if args.command == "run":
            from .workflow.survey_cli import run_run_command

            return run_run_command(args)
        if args.command == "report":
            from .qa.report import run_report_command

            return run_report_command(args)
        if args.command == "pipeline":
            from .workflow.pipeline import dump_pipeline_yaml, recommended_pipeline

            text = dump_pipeline_yaml(recommended_pipeline(args.method))
            if args.out:
                args.out.write_text(text)
            else:
                print(text, end="")
            return 0
    except DiffimError as exc:
        print(f"diffim-dask {args.command}: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
