"""Alard-Lupton subtraction and detection benchmark on simulated pairs.

Usage::

    .venv/bin/python benchmarks/bench_subtract_detect.py [--size 4096] [--repeat 3]
        [--steps subtract detect] [--workers N]

Each measurement runs in its own process: the Alard-Lupton subtraction of a
SIZE² pair (kernel fit, convolution, decorrelation; median wall time of REPEAT
runs, the per-step breakdown from the result's metadata, peak memory), and
detection + measurement of the difference (with ~1000 injected transients; one
untimed warm-up run first, so one-off imports and caches are not counted; the
REPEAT timed runs without tracemalloc, whose allocation hook would slow the
Python-level measurement code several-fold, then one traced run for the memory
peaks, its time in ``traced_run_s``). Detection also records the median process
CPU time per run (all threads; on a busy machine it is the steadier figure),
the numbers of dipole and trail fits, the thread count (``--workers``; 0 =
automatic) and the 1-minute load average before and after the timed runs (the
machine may be shared). Results go to ``benchmarks/results/subtract_detect.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, measure_here, run_step_subprocess, save  # noqa: E402


def _pair(size: int, n_transients: int):
    from diffim_dask.simulate import simulate_pair

    return simulate_pair(shape=(size, size), n_transients=n_transients, seed=3)


def step(name: str, size: int, repeat: int, workers: int = 0) -> dict:
    from diffim_dask.subtract import subtract_alard_lupton
    from diffim_dask.workflow.pipeline import recommended_pipeline

    config = recommended_pipeline().alard_lupton
    if name == "subtract":
        pair = _pair(size, 200)
        results = [None]

        def run():
            # Only the last result is kept, so earlier ones do not inflate the memory peaks.
            results[0] = None
            results[0] = subtract_alard_lupton(pair.science, pair.template, config)

        measured = measure_here(run, repeat)
        meta = results[0].metadata
        measured["steps_s"] = {k[5:]: round(v, 3) for k, v in meta.items() if k.startswith("time_")}
        return measured
    if name == "detect":
        from diffim_dask.detect import DetectAndMeasureConfig, detect_and_measure

        pair = _pair(size, 1000)
        result = subtract_alard_lupton(pair.science, pair.template, config)
        detect_config = DetectAndMeasureConfig.from_dict({"workers": workers})
        found, timings = [None], []

        def run():
            # Only the last result is kept, so earlier ones do not inflate the memory peaks.
            found[0] = None
            found[0] = detect_and_measure(result.difference, science=pair.science,
                                          matched_template=result.matched_image,
                                          config=detect_config)
            timings.append(found[0].metadata["timing"])

        run()
        load_before = os.getloadavg()[0]
        # Timed runs without tracemalloc: its per-allocation hook slows the Python-level
        # measurement code several-fold (centroids 0.2 s -> 0.8 s); one traced run after
        # them gives the memory peaks.
        walls, cpus = [], []
        for _ in range(repeat):
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        load_after = os.getloadavg()[0]
        measured = measure_here(run, 1)
        measured["traced_run_s"] = round(measured["median_s"], 4)
        measured["median_s"] = statistics.median(walls)
        measured["runs_s"] = [round(t, 4) for t in walls]
        measured["cpu_s_per_run"] = round(statistics.median(cpus), 3)
        measured["load_average_1min"] = [round(load_before, 2), round(load_after, 2)]
        measured["workers"] = workers
        meta = found[0].metadata
        measured["n_sources"] = int(len(found[0].catalog))
        measured["n_dipole_fits"] = int(meta["n_dipole_fits"])
        measured["n_trail_fits"] = int(meta["n_trail_fits"])
        # Median over the timed (untraced) runs of each step.
        timed = timings[1:1 + repeat]
        measured["steps_s"] = {k: round(statistics.median(t[k] for t in timed), 3)
                               for k in timed[-1]}
        return measured
    raise SystemExit(f"unknown step {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", nargs="+", default=["subtract", "detect"],
                        choices=["subtract", "detect"])
    parser.add_argument("--workers", type=int, default=0,
                        help="detection threads (0: automatic)")
    parser.add_argument("--step")
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, args.size, args.repeat, args.workers)))
        return
    results = {"size": args.size, "repeat": args.repeat}
    stored = RESULTS / "subtract_detect.json"
    if set(args.steps) != {"subtract", "detect"} and stored.exists():
        # A partial run keeps the other step's stored result (same image size only).
        previous = json.loads(stored.read_text())
        if previous.get("size") == args.size:
            results.update({k: v for k, v in previous.items()
                            if k in ("subtract", "detect") and k not in args.steps})
    for name in args.steps:
        r = run_step_subprocess(Path(__file__), name, "--size", str(args.size), "--repeat",
                                str(args.repeat), "--workers", str(args.workers))
        r["repeat"] = args.repeat
        results[name] = r
        print(f"{name}: median {r['median_s']:.2f} s (runs {r['runs_s']}), traced peak "
              f"{r['traced_peak_mb']:.0f} MB, process peak {r['max_rss_mb']:.0f} MB"
              + (f", {r['n_sources']} sources" if "n_sources" in r else ""))
        print(f"  steps: {r['steps_s']}")
    print(f"saved {save('subtract_detect', results)}")


if __name__ == "__main__":
    main()
