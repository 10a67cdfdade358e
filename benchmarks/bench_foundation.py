"""Foundation benchmark: simulate a 4096x4096 visit, read it back from FITS and from Zarr.

Usage::

    .venv/bin/python benchmarks/bench_foundation.py [--size 4096] [--repeat 3] [--workdir DIR]

Prints a table of median wall time and peak memory per step and saves
``benchmarks/results/foundation.json``. Every step runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import measure_here, run_step_subprocess, save  # noqa: E402


def _config(size: int):
    from diffim_dask.simulate import SurveyConfig

    return SurveyConfig(seed=11, n_visits=1, n_detectors=1, detector_shape=(size, size))


def step(name: str, size: int, repeat: int, workdir: Path) -> dict:
    from diffim_dask.io import ExposureStore, read_exposure, write_exposure_fits
    from diffim_dask.simulate import Survey

    fits_path = workdir / "visit.fits"
    store = ExposureStore(workdir / "visits.zarr")
    if name == "simulate":
        survey = Survey(_config(size))
        survey.sky  # the static sky is drawn once per survey; time the image itself
        return measure_here(lambda: survey.simulate_visit(0, 0), repeat)
    if name == "prepare":
        exposure = Survey(_config(size)).simulate_visit(0, 0).exposure
        write_exposure_fits(exposure, fits_path, overwrite=True)
        store.write(exposure, overwrite=True)
        return {"fits_mb": fits_path.stat().st_size / 2**20}
    if name == "write_fits":
        exposure = Survey(_config(size)).simulate_visit(0, 0).exposure
        return measure_here(lambda: write_exposure_fits(exposure, workdir / "w.fits", overwrite=True), repeat)
    if name == "write_zarr":
        exposure = Survey(_config(size)).simulate_visit(0, 0).exposure
        other = ExposureStore(workdir / "w.zarr")
        return measure_here(lambda: other.write(exposure, overwrite=True), repeat)
    if name == "read_fits":
        return measure_here(lambda: read_exposure(fits_path).arrays(), repeat)
    if name == "read_zarr":
        return measure_here(lambda: store.open(0, 0).arrays(), repeat)
    if name == "open_zarr_lazy":
        return measure_here(lambda: store.open(0, 0), repeat)
    raise SystemExit(f"unknown step {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--step")
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, args.size, args.repeat, args.workdir)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        common = ["--size", str(args.size), "--repeat", str(args.repeat), "--workdir", str(workdir)]
        results = {"size": args.size, "repeat": args.repeat, "steps": {}}
        run_step_subprocess(Path(__file__), "prepare", *common)
        print(f"{'step':16s} {'median s':>9s} {'runs':>24s} {'traced MB':>10s} {'peak RSS MB':>12s}")
        for name in ("simulate", "write_fits", "write_zarr", "read_fits", "read_zarr", "open_zarr_lazy"):
            r = run_step_subprocess(Path(__file__), name, *common)
            results["steps"][name] = r
            print(f"{name:16s} {r['median_s']:9.3f} {str(r['runs_s']):>24s} "
                  f"{r['traced_peak_mb']:10.0f} {r['max_rss_mb']:12.0f}")
    print(f"saved {save('foundation', results)}")


if __name__ == "__main__":
    main()
