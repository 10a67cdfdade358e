"""Alard-Lupton subtraction and detection benchmark on simulated pairs.

Usage::

    .venv/bin/python benchmarks/bench_subtract_detect.py [--size 4096] [--repeat 3]

Each measurement runs in its own process: the Alard-Lupton subtraction of a
SIZE² pair (kernel fit, convolution, decorrelation; median wall time of REPEAT
runs, the per-step breakdown from the result's metadata, peak memory), and
detection + measurement of the difference (with ~1000 injected transients).
Results go to ``benchmarks/results/subtract_detect.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import measure_here, run_step_subprocess, save  # noqa: E402


def _pair(size: int, n_transients: int):
    from diffim_dask.simulate import simulate_pair

    return simulate_pair(shape=(size, size), n_transients=n_transients, seed=3)


def step(name: str, size: int, repeat: int) -> dict:
    from diffim_dask.subtract import subtract_alard_lupton
    from diffim_dask.workflow.pipeline import recommended_pipeline

    config = recommended_pipeline().alard_lupton
    if name == "subtract":
        pair = _pair(size, 200)
        results = []
        measured = measure_here(lambda: results.append(subtract_alard_lupton(pair.science, pair.template,
                                                                             config)), repeat)
        meta = results[-1].metadata
        measured["steps_s"] = {k[5:]: round(v, 3) for k, v in meta.items() if k.startswith("time_")}
        return measured
    if name == "detect":
        from diffim_dask.detect import detect_and_measure

        pair = _pair(size, 1000)
        result = subtract_alard_lupton(pair.science, pair.template, config)
        found = []
        measured = measure_here(lambda: found.append(detect_and_measure(
            result.difference, science=pair.science, matched_template=result.matched_image)), repeat)
        measured["n_sources"] = int(len(found[-1].catalog))
        measured["steps_s"] = {k: round(v, 3) for k, v in found[-1].metadata.get("timing", {}).items()}
        return measured
    raise SystemExit(f"unknown step {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--step")
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, args.size, args.repeat)))
        return
    results = {"size": args.size, "repeat": args.repeat}
    for name in ("subtract", "detect"):
        r = run_step_subprocess(Path(__file__), name, "--size", str(args.size), "--repeat", str(args.repeat))
        results[name] = r
        print(f"{name}: median {r['median_s']:.2f} s (runs {r['runs_s']}), traced peak "
              f"{r['traced_peak_mb']:.0f} MB, process peak {r['max_rss_mb']:.0f} MB"
              + (f", {r['n_sources']} sources" if "n_sources" in r else ""))
        print(f"  steps: {r['steps_s']}")
    print(f"saved {save('subtract_detect', results)}")


if __name__ == "__main__":
    main()
