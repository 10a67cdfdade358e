"""Compare our subtraction methods with peer packages on the same injected image pairs.

Methods
    ``alard-lupton`` and ``alard-lupton-score`` (and ``zogy`` when this
    version has it) from diffim_dask; the peers, when installed:
    ``sfft`` (pip install sfft; its NumPy backend, the template convolved,
    kernel and background polynomial orders 2, kernel half-width 2 × the
    larger FWHM) and ``properimage`` (pip install properimage; its ZOGY
    ``operations.subtract`` with Gaussian-fitted PSFs). Peers are optional:
    the script runs without them and says which were not found.

Pairs
    ``--pairs`` simulated science/template pairs (:func:`diffim_dask.simulate.simulate_pair`,
    science PSF FWHM 3.5 px varying by 15 %, template 2.5 px, template noise
    0.25 × the science's) and, with ``--decam DIR``, the real DECam stacks
    (Stack-DEC-OBS04 science, Stack-DEC-OBS18 template). Into each science
    image ``--inject`` point sources at S/N 3–30 are injected
    (:func:`diffim_dask.qa.injection.inject_sources`), the same for every method.

Measurements (per pair and method; every method runs in a fresh subprocess)
    * ``wall_s`` — the subtraction call alone (numba-compiled peers compile on
      their first pair; later pairs reuse the on-disk cache);
    * ``peak_mb`` — growth of the process's peak resident memory during the call;
    * ``noise_std`` / ``noise_robust_std`` — scatter of the normalised
      difference ``D / sqrt(V)`` over clean pixels; ``V`` is the method's own
      variance plane, or for peers without one ``var_science + var_template``
      (``variance`` column says which);
    * ``sky_snr_std`` — scatter of PSF fluxes over their errors on empty sky
      (our detection's sky sources), i.e. how well ``V`` describes the noise
      on the PSF scale (meaningless for score methods, whose difference is
      preconvolved); ``calibration`` — the factor applied to the noise below
      (``sky_snr_std``, or the score's pixel scatter for score methods);
    * completeness and false detections at a 5σ threshold of the *real*
      noise: the same detection (:func:`diffim_dask.detect.detect_and_measure`)
      runs on every difference with ``V`` rescaled by ``sky_snr_std²`` (for
      score methods, which detect on the score image: the score's variance by
      the square of the score's robust pixel scatter), the
      detections are matched one-to-one to the injections within 3 px
      (:func:`diffim_dask.qa.completeness.match_injections`); ``c_snr5`` and
      ``c_snr10`` are the fitted completeness at S/N 5 and 10, ``snr50`` where it
      reaches 50 % (all pairs of a method together), ``false_per_pair`` the
      DIA sources farther than 3 px from every injection (includes the
      pairs' real variable sources and artefacts).

Outputs (``--out``, default ``benchmarks/results/compare_peers``): ``.json``
(every number), ``.md`` (the table) and ``.png`` (the plot).

Examples
--------
    python benchmarks/compare_peers.py --pairs 3 --size 256 --inject 40
    python benchmarks/compare_peers.py --decam ../shared/data/decam-sfft --pairs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

OURS = ("alard-lupton", "alard-lupton-score", "zogy")
PEERS = ("sfft", "properimage")
RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------


def available_methods() -> tuple[list[str], dict[str, str]]:
    """Methods that can run here, and why the others cannot."""
    import importlib.util

    methods, missing = ["alard-lupton", "alard-lupton-score"], {}
    if importlib.util.find_spec("diffim_dask.zogy") is not None:
        methods.append("zogy")
    else:
        missing["zogy"] = "diffim_dask.zogy is not in this version"
    for peer in PEERS:
        try:
            if peer == "sfft":
                from sfft.CustomizedPacket import Customized_Packet  # noqa: F401
            else:
                from properimage import operations  # noqa: F401
            methods.append(peer)
        except Exception as exc:  # missing package or a broken dependency of it
            missing[peer] = f"{type(exc).__name__}: {exc}"
    return methods, missing


# ----------------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------------


def load_pair(spec: dict):
    """(science with injections, template, truth) of a pair spec; deterministic."""
    from diffim_dask.qa.injection import InjectionConfig, inject_sources

    if spec["kind"] == "simulated":
        from diffim_dask.simulate import simulate_pair

        pair = simulate_pair((spec["size"], spec["size"]), n_transients=0, seed=spec["seed"],
                             science_fwhm=3.5, template_fwhm=2.5, science_fwhm_variation=0.15,
                             template_noise_factor=0.25)
        science, template = pair.science, pair.template
    else:
        from diffim_dask.io import read_exposure
        from diffim_dask.psf import estimate_psf

        science = read_exposure(Path(spec["path"]) / "Stack-DEC-OBS04.fits")
        template = read_exposure(Path(spec["path"]) / "Stack-DEC-OBS18.fits")
        science = science.replace(psf=estimate_psf(science).psf)
        template = template.replace(psf=estimate_psf(template).psf)
    config = InjectionConfig(n_sources=spec["inject"], snr_range=(3.0, 30.0),
                             edge_margin=max(16, spec.get("edge", 24)))
    injection = inject_sources(science, config, seed=1000 + spec["seed"])
    return injection.exposure, template, injection.truth


# ----------------------------------------------------------------------------------------------
# Methods: each returns (difference Exposure, score Exposure or None, variance source)
# ----------------------------------------------------------------------------------------------


def _ours(method: str, science, template):
    from diffim_dask.subtract import subtract_alard_lupton, subtract_alard_lupton_preconvolved

    if method == "alard-lupton":
        result = subtract_alard_lupton(science, template)
    elif method == "alard-lupton-score":
        result = subtract_alard_lupton_preconvolved(science, template)
    else:
        from diffim_dask.zogy import subtract_zogy

        result = subtract_zogy(science, template)
    return result.difference, result.score, "method", result.matched_image


def _proxy_difference(science, template, image):
    """A peer's difference as an Exposure: input variances summed, masks OR-ed, science PSF."""
    sci_img, sci_var, sci_mask = science.arrays()
    _, tmp_var, tmp_mask = template.arrays()
    variance = (sci_var.astype(np.float64) + tmp_var).astype(np.float32)
    bad = ~np.isfinite(image)
    mask = sci_mask | tmp_mask
    if bad.any():
        from diffim_dask.masks import mask_value

        mask = mask | np.where(bad, np.uint32(mask_value("NO_DATA")), np.uint32(0))
        image = np.where(bad, 0.0, image)
        variance = np.where(bad, 0.0, variance)
    return science.with_planes(image=np.asarray(image, np.float32), variance=variance, mask=mask)


def _sfft(science, template, workdir: Path):
    from astropy.io import fits
    from sfft.CustomizedPacket import Customized_Packet

    from diffim_dask.masks import mask_value

    sci, _, sci_mask = science.arrays()
    ref, _, ref_mask = template.arrays()
    # Pixels left out of the kernel fit (ours leave out the same): defects and injected cores.
    excluded = ((sci_mask | ref_mask) & np.uint32(mask_value(("NO_DATA", "BAD", "SAT", "INJECTED",
                                                              "INJECTED_TEMPLATE")))) != 0
    fwhm = max(science.psf.fwhm(*science.center), template.psf.fwhm(*template.center))
    paths = {name: str(workdir / f"{name}.fits") for name in ("ref", "sci", "mref", "msci", "diff")}
    # sfft reads FITS with NAXIS1 = x; our arrays are (y, x) like FITS data, so write as they are.
    fits.writeto(paths["ref"], ref.astype(np.float64), overwrite=True)
    fits.writeto(paths["sci"], sci.astype(np.float64), overwrite=True)
    fits.writeto(paths["mref"], np.where(excluded, 0.0, ref).astype(np.float64), overwrite=True)
    fits.writeto(paths["msci"], np.where(excluded, 0.0, sci).astype(np.float64), overwrite=True)
    force = "REF" if template.psf.fwhm(*template.center) <= science.psf.fwhm(*science.center) else "SCI"
    Customized_Packet.CP(FITS_REF=paths["ref"], FITS_SCI=paths["sci"], FITS_mREF=paths["mref"],
                         FITS_mSCI=paths["msci"], ForceConv=force, GKerHW=int(round(2 * fwhm)),
                         FITS_DIFF=paths["diff"], KerPolyOrder=2, BGPolyOrder=2, ConstPhotRatio=True,
                         BACKEND_4SUBTRACT="Numpy", NUM_CPU_THREADS_4SUBTRACT=1, NUMBA_CACHE=True,
                         VERBOSE_LEVEL=0)
    difference = fits.getdata(paths["diff"]).astype(np.float64)
    if force == "SCI":
        # The difference then has the template's PSF and zero point; the template PSF applies.
        return _proxy_difference(science, template, difference).replace(psf=template.psf), None, \
            "proxy", None
    return _proxy_difference(science, template, difference), None, "proxy", None


def _properimage(science, template):
    from properimage import operations

    from diffim_dask.psf import ImagePsf

    sci, _, _ = science.arrays()
    ref, _, _ = template.arrays()
    D, P, S_corr, mix_mask = operations.subtract(ref=ref.astype(np.float64), new=sci.astype(np.float64),
                                                 smooth_psf=False, fitted_psf=True, iterative=False,
                                                 beta=True, shift=False)
    D = np.real(np.asarray(D, dtype=np.complex128)).astype(np.float64)
    D[np.asarray(mix_mask, bool)] = np.nan
    # P is a full-frame PSF image of D: cut a centred odd stamp as the difference PSF.
    P = np.fft.fftshift(np.real(np.asarray(P)))
    cy, cx = np.unravel_index(np.argmax(P), P.shape)
    half = max(5, int(round(3 * science.psf.fwhm(*science.center))))
    stamp = P[cy - half:cy + half + 1, cx - half:cx + half + 1]
    difference = _proxy_difference(science, template, D).replace(psf=ImagePsf(stamp / stamp.sum()))
    return difference, None, "proxy", None


def run_method(method: str, spec: dict, workdir: str) -> dict:
    """Subtract, detect and match one pair with one method (runs in a fresh subprocess)."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(workdir) / "numba_cache"))
    from diffim_dask.qa.completeness import exposure_area, match_injections
    from diffim_dask.qa.report import noise_statistics

    science, template, truth = load_pair(spec)
    out = {"pair": spec["name"], "method": method}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        if method in OURS:
            difference, score, variance_source, matched = _ours(method, science, template)
        elif method == "sfft":
            pair_dir = Path(workdir) / f"{spec['name']}_sfft"
            pair_dir.mkdir(parents=True, exist_ok=True)
            difference, score, variance_source, matched = _sfft(science, template, pair_dir)
        else:
            difference, score, variance_source, matched = _properimage(science, template)
    except Exception as exc:
        out.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc(limit=5))
        return out
    out["wall_s"] = round(time.perf_counter() - start, 3)
    out["peak_mb"] = round(max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024, 1)
    difference = difference.compute()
    _, noise = noise_statistics(difference)
    out.update(status="done", variance=variance_source, noise_std=noise["std"],
               noise_robust_std=noise["robust_std"])
    try:
        detection = _calibrated_detection(difference, score, science, matched, out)
    except Exception as exc:  # a detection failure on a peer's difference is a result too
        out.update(status="failed", error=f"detection: {type(exc).__name__}: {exc}")
        return out
    matched_truth, sources = match_injections(truth.assign(visit=0, detector=0),
                                              detection.catalog.assign(visit=0, detector=0), 3.0)
    area = exposure_area(detection.difference)
    out.update(n_injected=int(len(truth)), n_found=int(matched_truth["found"].sum()),
               n_sources=int(len(sources)), n_false=int((~sources["near_truth"]).sum()),
               area_deg2=area["area_deg2"],
               truth=matched_truth[["expected_snr", "found", "flux_bias", "flux_pull"]].to_dict("list"))
    return out


def _calibrated_detection(difference, score, science, matched, out: dict):
    """Detection at 5σ of the real noise.

    Without a score image: a first detection measures ``sky_snr_std`` (scatter of PSF flux
    over error on sky sources) and the variance is multiplied by its square. With a score
    image (already the per-pixel matched-filter S/N): its variance is multiplied by the
    square of the robust scatter of ``score / sqrt(V)`` over clean pixels.
    """
    from diffim_dask.detect import detect_and_measure
    from diffim_dask.qa.report import noise_statistics

    first = detect_and_measure(difference, science=science, matched_template=matched, score=score)
    out["sky_snr_std"] = float(first.metadata.get("sky_snr_std", math.nan))
    if score is not None:
        score = score.compute()
        _, score_noise = noise_statistics(score)
        scale = float(score_noise["robust_std"])
        out["score_noise"] = scale
        out["calibration"] = scale
        s_var = score.arrays()[1]
        return detect_and_measure(difference, science=science, matched_template=matched,
                                  score=score.with_planes(variance=(s_var * scale ** 2).astype(np.float32)))
    scale = out["sky_snr_std"] if math.isfinite(out["sky_snr_std"]) and out["sky_snr_std"] > 0 else 1.0
    out["calibration"] = scale
    variance = difference.arrays()[1]
    calibrated = difference.with_planes(
        variance=(variance.astype(np.float64) * scale ** 2).astype(np.float32))
    return detect_and_measure(calibrated, science=science, matched_template=matched)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _summarise(rows: list[dict]) -> pd.DataFrame:
    from diffim_dask.errors import ConfigurationError
    from diffim_dask.qa.completeness import fit_completeness

    table = []
    frame = pd.DataFrame([r for r in rows if r.get("status") == "done"])
    for method, group in frame.groupby("method", sort=False) if len(frame) else []:
        snr = np.concatenate([np.asarray(t["expected_snr"], float) for t in group["truth"]])
        found = np.concatenate([np.asarray(t["found"], bool) for t in group["truth"]])
        bias = np.concatenate([np.asarray(t["flux_bias"], float) for t in group["truth"]])
        strong = found & (snr >= 10) & np.isfinite(bias)
        try:
            fit = fit_completeness(snr, found, n_bootstrap=0)
            c5, c10, snr50 = float(fit(5.0)), float(fit(10.0)), fit.x50
        except ConfigurationError:
            c5 = c10 = snr50 = math.nan
        table.append({
            "method": method, "pairs": len(group),
            "wall_s": float(group["wall_s"].median()), "wall_s_max": float(group["wall_s"].max()),
            "peak_mb": float(group["peak_mb"].median()),
            "variance": group["variance"].iloc[0],
            "noise_std": float(group["noise_std"].mean()),
            "noise_robust_std": float(group["noise_robust_std"].mean()),
            "sky_snr_std": float(group["sky_snr_std"].mean()),
            "calibration": float(group["calibration"].mean()),
            "completeness": float(found.mean()), "c_snr5": c5, "c_snr10": c10, "snr50": snr50,
            "false_per_pair": float(group["n_false"].mean()),
            "flux_bias_median": float(np.median(bias[strong])) if strong.any() else math.nan,
        })
    return pd.DataFrame(table)


def _plot(summary: pd.DataFrame, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), dpi=100)
    axes = fig.subplots(1, 4)
    names = summary["method"].tolist()
    colours = [f"C{i}" for i in range(len(names))]
    axes[0].bar(names, summary["wall_s"], color=colours)
    axes[0].set_ylabel("median wall time (s)")
    axes[1].bar(names, summary["peak_mb"], color=colours)
    axes[1].set_ylabel("peak memory growth (MB)")
    axes[2].bar(names, summary["false_per_pair"], color=colours)
    axes[2].set_ylabel("false detections per pair (5σ real noise)")
    for ax in axes[:3]:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    frame = pd.DataFrame([r for r in rows if r.get("status") == "done"])
    bins = np.array([3, 4, 5, 6, 7, 8, 10, 13, 17, 22, 30.0])
    for colour, method in zip(colours, names):
        group = frame[frame["method"] == method]
        snr = np.concatenate([np.asarray(t["expected_snr"], float) for t in group["truth"]])
        found = np.concatenate([np.asarray(t["found"], bool) for t in group["truth"]])
        centres, values = [], []
        for lo, hi in zip(bins[:-1], bins[1:]):
            inside = (snr >= lo) & (snr < hi)
            if inside.any():
                centres.append(math.sqrt(lo * hi))
                values.append(found[inside].mean())
        axes[3].plot(centres, values, "o-", color=colour, label=method, ms=3)
    axes[3].set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    axes[3].xaxis.set_major_locator(FixedLocator([3, 5, 10, 20, 30]))
    axes[3].xaxis.set_major_formatter(ScalarFormatter())
    axes[3].xaxis.set_minor_locator(NullLocator())
    axes[3].set_xlabel("injected S/N")
    axes[3].set_ylabel("completeness")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="simulated pairs (default %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="pair side in pixels (default %(default)s)")
    parser.add_argument("--inject", type=int, default=40,
                        help="point sources injected per pair (default %(default)s)")
    parser.add_argument("--decam", type=Path, default=None,
                        help="decam-sfft folder: add the real DECam pair")
    parser.add_argument("--methods", nargs="*", default=None, help="restrict to these methods")
    parser.add_argument("--out", type=Path, default=RESULTS / "compare_peers",
                        help="output path without suffix (default %(default)s)")
    args = parser.parse_args(argv)
    methods, missing = available_methods()
    if args.methods:
        methods = [m for m in methods if m in args.methods]
    for name, why in missing.items():
        print(f"skipping {name}: {why}")
    specs = [{"kind": "simulated", "name": f"sim{seed}", "seed": seed, "size": args.size,
              "inject": args.inject} for seed in range(args.pairs)]
    if args.decam is not None:
        specs.append({"kind": "decam", "name": "decam", "seed": 99, "path": str(args.decam.resolve()),
                      "inject": args.inject, "edge": 24})
    rows = []
    with tempfile.TemporaryDirectory(prefix="compare_peers_") as workdir:
        for spec in specs:
            for method in methods:
                # A fresh process per measurement: its peak memory and imports are its own.
                with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"),
                                         max_tasks_per_child=1) as pool:
                    row = pool.submit(run_method, method, spec, workdir).result()
                rows.append(row)
                status = (f"{row['wall_s']:7.2f} s  found {row['n_found']}/{row['n_injected']}  "
                          f"false {row['n_false']}  sky_snr_std {row['sky_snr_std']:.2f}"
                          if row["status"] == "done" else f"FAILED {row['error']}")
                print(f"{spec['name']:8s} {method:20s} {status}", flush=True)
    summary = _summarise(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "argv": sys.argv[1:],
            "missing": missing}
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "summary": summary.to_dict("records"),
         "runs": [{k: v for k, v in r.items() if k != "truth"} for r in rows]}, indent=1, default=float))
    columns = ["method", "pairs", "wall_s", "peak_mb", "variance", "noise_robust_std", "calibration",
               "completeness", "c_snr5", "c_snr10", "snr50", "false_per_pair", "flux_bias_median"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for record in summary[columns].to_dict("records") if len(summary) else []:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v)
                                      for v in record.values()) + " |")
    notes = [f"- {name} not run: {why}" for name, why in missing.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines + [""] + notes) + "\n")
    print("\n".join(lines))
    try:
        if len(summary):
            _plot(summary, rows, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"\nwritten {args.out}.json / .md / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
