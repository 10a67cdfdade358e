"""Benchmark: time and peak memory of get_template for a 4096 x 4096 detector built from 4 patches.

Run::

    .venv/bin/python benchmarks/bench_template.py [--runs 3] [--size 4096] [--kernel spline5]

The script writes four 2400 x 2400 coadd patches (2200-pixel inner boxes,
100-pixel borders, ~3000 stars plus noise each) to a temporary Zarr store,
centres a detector on their common corner (slightly rotated, so the mapping is
a true warp) and times :func:`diffim_dask.template.get_template` on it. Each
run happens in a fresh subprocess so its peak resident memory (``ru_maxrss``)
is its own; the numpy allocation peak inside ``get_template`` is measured
with ``tracemalloc`` (numpy reports its buffers to it). It prints the median
and the range of the runs, and the sizes of the inputs and the output for
comparison. Nothing here is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import dask.array as da
import numpy as np

from diffim_dask.exposure import Exposure, PhotoCalib, VisitInfo
from diffim_dask.psf import GaussianPsf
from diffim_dask.simulate.geometry import tangent_wcs
from diffim_dask.simulate.render import render_point_sources
from diffim_dask.template import (CoaddStore, GetTemplateConfig, RingsSkyMap, SkyMapConfig,
                                  WarpConfig, get_template)

PATCH_INNER = 2200
PATCH_BORDER = 100


def _skymap() -> RingsSkyMap:
    return RingsSkyMap(SkyMapConfig(n_rings=120, pixel_scale=0.2, patch_inner_size=PATCH_INNER,
                                    patch_border=PATCH_BORDER))


def _science(skymap: RingsSkyMap, size: int) -> Exposure:
    """A detector centred on the common corner of four patches near a tract centre."""
    tract = skymap.tract(skymap.find_tract(150.0, 2.0))
    n_x, n_y = tract.n_patches
    corner_x = (n_x // 2) * PATCH_INNER - 0.5
    corner_y = (n_y // 2) * PATCH_INNER - 0.5
    (ra,), (dec,) = tract.pixel_to_sky([corner_x], [corner_y])
    wcs = tangent_wcs(float(ra), float(dec), skymap.config.pixel_scale,
                      ((size - 1) / 2.0, (size - 1) / 2.0), rotation=0.2)
    # The science pixels are never read by get_template: a lazy placeholder.
    image = da.zeros((size, size), dtype=np.float32, chunks=1024)
    return Exposure.from_arrays(image, wcs=wcs, info=VisitInfo(visit=1, detector=0, band="r"))


def _write_patches(store: CoaddStore, science: Exposure) -> list[tuple[int, int]]:
    rng = np.random.default_rng(1)
    psf = GaussianPsf(2.5)
    written = []
    for patch in store.skymap.patches_overlapping(science.wcs, science.shape, border=20):
        ny, nx = patch.shape
        model = np.zeros((ny, nx))
        n_stars = 3000
        x = patch.origin[0] + rng.uniform(0, nx - 1, n_stars)
        y = patch.origin[1] + rng.uniform(0, ny - 1, n_stars)
        render_point_sources(model, x, y, rng.uniform(1e2, 1e5, n_stars), psf, origin=patch.origin)
        variance = np.full((ny, nx), 25.0, dtype=np.float32)
        image = (model + 5.0 * rng.standard_normal((ny, nx))).astype(np.float32)
        exposure = Exposure.from_arrays(image, variance, wcs=patch.wcs, psf=psf,
                                        photo_calib=PhotoCalib(32.0),
                                        info=VisitInfo(band="r"), origin=patch.origin)
        store.write(exposure, "r", patch.tract, patch.id)
        written.append(patch.key)
    return written


def _one_run(root: str, size: int, kernel: str, block: int) -> dict:
    """Executed in a subprocess: one get_template call, measured."""
    store = CoaddStore(root)
    science = _science(store.skymap, size)
    config = GetTemplateConfig(warp=WarpConfig(kernel=kernel), block_size=block)
    tracemalloc.start()
    start = time.perf_counter()
    result = get_template(science, store, config)
    elapsed = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"seconds": elapsed, "traced_peak_mb": traced_peak / 2 ** 20,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "valid_fraction": result.valid_fraction, "patches": len(result.patches),
            "steps": result.metadata["seconds"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="number of timed runs")
    parser.add_argument("--size", type=int, default=4096, help="detector side (pixels)")
    parser.add_argument("--kernel", default="spline5", help="WarpConfig.kernel")
    parser.add_argument("--chunk", type=int, default=1024, help="chunk side of the stored patches")
    parser.add_argument("--block", type=int, default=1024, help="GetTemplateConfig.block_size")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_one_run(args.child, args.size, args.kernel, args.block)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "templates.zarr")
        skymap = _skymap()
        store = CoaddStore(root, skymap, chunk_size=args.chunk)
        science = _science(skymap, args.size)
        written = _write_patches(store, science)
        patch_mb = sum(math.prod(store.patch_info(*key).shape) * 12 for key in written) / 2 ** 20
        print(f"detector {args.size}x{args.size}, kernel {args.kernel}, blocks {args.block}, "
              f"{len(written)} patches "
              f"({patch_mb:.0f} MB of coadd pixels, {args.chunk}-pixel chunks), output "
              f"{args.size ** 2 * 12 / 2 ** 20:.0f} MB (image+variance+mask)")
        runs = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, __file__, "--child", root, "--size",
                                  str(args.size), "--kernel", args.kernel, "--block",
                                  str(args.block)],
                                 check=True, capture_output=True, text=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for key, label in (("seconds", "time (s)"), ("traced_peak_mb", "numpy peak (MB)"),
                       ("maxrss_mb", "process peak RSS (MB)")):
        values = [r[key] for r in runs]
        print(f"{label:24s} median {statistics.median(values):8.2f}   "
              f"min {min(values):8.2f}   max {max(values):8.2f}")
    steps = {k: statistics.median(r["steps"][k] for r in runs) for k in runs[0]["steps"]}
    print("median step times (s):", ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
    print(f"valid fraction {runs[0]['valid_fraction']:.4f}, patches read {runs[0]['patches']}")


if __name__ == "__main__":
    main()
