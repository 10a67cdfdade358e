"""Benchmark: wall time, per-step breakdown and peak memory of ZOGY on a 4096 x 4096 pair.

Usage::

    .venv/bin/python benchmarks/bench_zogy.py [--size 4096] [--repeat 3] [--workers 0]
                                              [--workdir DIR] [--config '{"tile_size": 256}']

A ``simulate_pair`` science/template pair (science FWHM 3.5 px varying by
±15 % across the detector, template FWHM 2.5 px, sub-pixel misregistration)
is written once to a work directory; the measurement runs in a fresh
subprocess that loads it and calls :func:`diffim_dask.zogy.subtract_zogy`
``repeat`` times with the default config (flux image included). Reported:
median wall time and all runs, the median of each step's time from the
result metadata (``time_*``; ``*_cpu`` sum the per-tile times over the worker
threads), peak resident memory of the process (``ru_maxrss``, inputs
included) and the numpy/Python allocation peak (``tracemalloc``), plus the
load average before and after (the machine may be shared). Results are saved
to ``benchmarks/results/zogy.json``. Nothing is asserted: a measurement, not
a test.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import measure_here, run_step_subprocess, save  # noqa: E402


def _pair_path(workdir: Path, size: int) -> Path:
    return workdir / f"zogy_pair_{size}.pkl"


def step(name: str, size: int, repeat: int, workdir: Path, workers: int, config: str) -> dict:
    if name == "prepare":
        from diffim_dask.simulate import simulate_pair

        start = time.perf_counter()
        pair = simulate_pair((size, size), misregistration=(0.37, -0.21), n_transients=200,
                             seed=5)
        with open(_pair_path(workdir, size), "wb") as handle:
            pickle.dump((pair.science, pair.template), handle)
        return {"simulate_s": time.perf_counter() - start}
    if name == "zogy":
        from diffim_dask.zogy import ZogyConfig, subtract_zogy

        with open(_pair_path(workdir, size), "rb") as handle:
            science, template = pickle.load(handle)
        cfg = ZogyConfig.from_dict({**json.loads(config or "{}"), "workers": workers})
        steps: list[dict] = []

        def run():
            result = subtract_zogy(science, template, cfg)
            meta = result.metadata
            steps.append({k: v for k, v in meta.items() if k.startswith("time_")})
            steps[-1].update(tile_size=meta["tile_size"], n_tiles=meta["n_tiles"],
                             tile_fft_shape=meta["tile_fft_shape"], workers=meta["workers"])
            del result, meta

        subtract_zogy(science, template, cfg)  # warm-up: imports, FFT plans
        load_before = os.getloadavg()
        cpu_before = time.process_time()
        out = measure_here(run, repeat)
        out["cpu_s_per_run"] = (time.process_time() - cpu_before) / repeat
        out["loadavg_before"] = load_before
        out["loadavg_after"] = os.getloadavg()
        keys = [k for k in steps[0] if k.startswith("time_")]
        out["steps_median_s"] = {k: statistics.median(s[k] for s in steps) for k in keys}
        out["layout"] = {k: steps[0][k] for k in ("tile_size", "n_tiles", "tile_fft_shape",
                                                   "workers")}
        return out
    raise SystemExit(f"unknown step {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
    parser.add_argument("--config", default="{}", help="extra ZogyConfig fields as JSON")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--step")
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, args.size, args.repeat, args.workdir, args.workers,
                              args.config)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        common = ["--size", str(args.size), "--repeat", str(args.repeat), "--workdir",
                  str(workdir), "--workers", str(args.workers), "--config", args.config]
        if not _pair_path(workdir, args.size).exists():
            prepared = run_step_subprocess(Path(__file__), "prepare", *common)
            print(f"simulated the {args.size}² pair in {prepared['simulate_s']:.1f} s")
        r = run_step_subprocess(Path(__file__), "zogy", *common)
    results = {"size": args.size, "repeat": args.repeat, "config": json.loads(args.config),
               "zogy": r}
    print(f"subtract_zogy {args.size}x{args.size}: median {r['median_s']:.2f} s, runs "
          f"{r['runs_s']}, CPU {r['cpu_s_per_run']:.2f} s/run, peak RSS "
          f"{r['max_rss_mb']:.0f} MB (inputs included), traced peak {r['traced_peak_mb']:.0f} MB")
    print(f"layout {r['layout']}; load average before {r['loadavg_before']}, after "
          f"{r['loadavg_after']}")
    for key, value in r["steps_median_s"].items():
        print(f"  {key[5:]:28s} {value:7.3f} s")
    print(f"saved {save('zogy', results)}")


if __name__ == "__main__":
    main()
