"""Shared timing/memory harness for the benchmark scripts.

Each measured step runs in a fresh Python subprocess so its peak resident memory
(``ru_maxrss``) belongs to that step alone; inside, ``tracemalloc`` records the
peak of Python and numpy allocations. Timings are medians of several repeats.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def measure_here(func, repeat: int) -> dict:
    """Time ``func()`` ``repeat`` times in this process; report median, all runs, memory peaks."""
    times = []
    tracemalloc.start()
    for _ in range(repeat):
        tracemalloc.reset_peak()
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "median_s": statistics.median(times),
        "runs_s": [round(t, 4) for t in times],
        "traced_peak_mb": traced_peak / 2**20,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_step_subprocess(script: Path, step: str, *args: str) -> dict:
    """Run ``script --step STEP ARGS`` and parse the JSON it prints on its last line."""
    proc = subprocess.run([sys.executable, str(script), "--step", step, *args],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import os

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}


def save(name: str, results: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **results}, indent=1))
    return path
