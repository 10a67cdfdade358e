"""An injection test of one science / template pair: inject in batches, subtract, detect, match.

:func:`run_injection_test` measures how deep a subtraction finds point
sources on any pair of exposures (real or simulated) on one pixel grid:

1. a baseline subtraction and detection without injections (the DIA sources
   already there: real variables, artefacts);
2. ``n_batches`` batches of ``batch_size`` sources each (so the image is not
   crowded), each injected into a fresh copy of the science image with its own
   seed (:func:`~diffim_dask.qa.injection.inject_sources`), away from the
   baseline's DIA sources and any ``known`` source (an injection on top of one
   would be credited with its detection), then subtracted and detected like
   the baseline;
3. one-to-one matching of every batch to its truth, and the aggregate
   completeness, false-detection rate and flux accuracy
   (:func:`~diffim_dask.qa.completeness.summarize_injections`).

False detections are the DIA sources of the injected images matched to no
injection and farther than the match radius from every injected position and
every ``known`` real source (so they include the baseline's other
detections: subtraction residuals, unknown variables); ``n_false_new`` leaves
out those within the radius of a baseline detection as well.

S/N in the difference image
    ``expected_snr`` is the S/N of an injection against the *science* image's
    noise. The difference also carries the template's noise, so each truth
    row gets ``difference_snr = F sqrt(Σ P² / V_D) / s_D`` too: the S/N
    against the difference's variance plane ``V_D`` and PSF, scaled by the
    difference's PSF-scale noise factor ``s_D = sky_snr_std``. An ideal
    detector with a threshold of 5σ of the real noise reaches 50 % at
    ``difference_snr = 5`` whatever the template depth, i.e. at an injected
    S/N of ``snr50_ideal = 5 × median(expected_snr / difference_snr)``: about
    5 for a template much deeper than the science image, about 5√2 for one
    as deep.

Noise-calibrated threshold
    When the variance plane of the difference understates the noise on the
    PSF scale (correlated noise of resampled or stacked images), the
    detection threshold "5σ" is really lower. Detection measures this on sky
    sources (``sky_snr_std`` in its metadata: the scatter of
    ``psfFlux / psfFluxErr`` on empty sky). ``summary_calibrated`` repeats
    the evaluation keeping only DIA sources with
    ``snr / sky_snr_std ≥ calibrated_threshold`` — completeness and false
    detections at a threshold that is 5σ of the real noise.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..errors import BadInputDataError, ConfigurationError
from ..exposure import Exposure
from .completeness import (InjectionSummary, exposure_area, match_injections,
                           summarize_injections)
from .injection import InjectionConfig, InjectionResult, inject_sources, psf_snr_per_count

__all__ = ["InjectionTest", "run_injection_test"]


@dataclasses.dataclass(frozen=True, eq=False)
class InjectionTest:
    """Result of :func:`run_injection_test`.

    Attributes
    ----------
    summary : InjectionSummary
        All batches together (each batch is one "image", ``visit`` = batch index).
    summary_calibrated : InjectionSummary or None
        The same with the noise-calibrated threshold (None when detection
        reported no ``sky_snr_std``).
    batches : pandas.DataFrame
        Per batch: ``batch``, ``seed``, ``n_injected``, ``n_found``,
        ``n_sources``, ``n_false``, ``n_false_new``, ``sky_snr_std``,
        ``noise_scale`` (PSF-scale noise factor of the science image),
        ``kernel_sum``, ``time_s``.
    baseline : pandas.DataFrame
        The DIA sources of the pair without injections.
    last : dict
        The last batch's ``injection`` (InjectionResult), ``subtraction`` and
        ``detection`` results, for cutouts and figures.
    metrics : dict
        ``summary.metrics`` plus ``n_false_new``, ``n_baseline_sources``,
        ``sky_snr_std`` (mean over batches) and, when available, the
        calibrated ``snr50_calibrated``, ``n_false_calibrated``,
        ``false_per_deg2_calibrated`` and ``completeness_calibrated``;
        ``difference_snr50`` (and ``_calibrated``): the 50 % point in
        difference-image S/N; ``snr_loss_factor``: median ratio of the
        injected S/N to the difference-image S/N (the template's noise and
        the PSF matching lower it), and ``snr50_ideal`` =
        ``calibrated_threshold × snr_loss_factor``: where an ideal detector
        with a threshold at that many σ of the difference's real noise
        reaches 50 % in injected S/N.
    """

    summary: InjectionSummary
    summary_calibrated: InjectionSummary | None
    batches: pd.DataFrame
    baseline: pd.DataFrame
    last: dict[str, Any]
    metrics: dict[str, Any]


def _default_subtract(config):
    from ..subtract import subtract_alard_lupton

    def subtract(science, template):
        return subtract_alard_lupton(science, template, config)

    return subtract


def _pipeline_subtract(pipeline):
    from ..workflow.run import subtract_exposures

    def subtract(science, template):
        return subtract_exposures(science, template, pipeline)

    return subtract


def _detect(subtraction, science, config):
    from ..detect import detect_and_measure

    return detect_and_measure(subtraction.difference, science=science,
                              matched_template=subtraction.matched_image, score=subtraction.score,
                              config=config)


def _real(catalog: pd.DataFrame) -> pd.DataFrame:
    return catalog[~catalog["isSky"].to_numpy(bool)].reset_index(drop=True)


def run_injection_test(science: Exposure, template: Exposure, *, n_sources: int = 200,
                       batch_size: int = 50, config: InjectionConfig | None = None, seed: int = 0,
                       subtract: Callable | None = None, subtraction_config=None,
                       detection_config=None, pipeline=None, known: pd.DataFrame | None = None,
                       radius: float = 3.0,
                       calibrated_threshold: float = 5.0, n_bootstrap: int = 50) -> InjectionTest:
    """Inject ``n_sources`` point sources in batches, subtract, detect and match.

    Parameters
    ----------
    science, template : Exposure
        On one pixel grid, each with a PSF.
    n_sources, batch_size : int
        Total sources and sources per batch (``ceil(n_sources / batch_size)``
        batches).
    config : InjectionConfig, optional
        Placement, S/N range and noise (its ``n_sources`` is replaced by the
        batch size); default ``InjectionConfig()`` (S/N 3–30, log-uniform).
    seed : int
        Batch ``b`` uses seed ``seed + b``.
    subtract : callable, optional
        ``subtract(science, template) -> SubtractionResult``; default
        :func:`~diffim_dask.subtract.subtract_alard_lupton` with
        ``subtraction_config``.
    detection_config : DetectAndMeasureConfig, optional
    pipeline : PipelineConfig or str, optional
        Run a workflow pipeline instead (a name such as ``"alard-lupton"``, a
        YAML path or a :class:`~diffim_dask.workflow.pipeline.PipelineConfig`):
        its method and subtraction config, and its detection config unless
        ``detection_config`` is given — the same calls as a survey run's
        cosmic-ray, subtract and detect stages (cosmic rays are repaired once,
        before any injection, and their counts join ``metrics``). Not combined
        with ``subtract`` or ``subtraction_config``.
    known : pandas.DataFrame, optional
        Positions (``x``, ``y``) of real sources of the pair (e.g. a known
        variable star): DIA sources within ``radius`` of them are not false
        detections (``n_known`` in the metrics).
    radius : float
        Match radius (pixels).
    calibrated_threshold : float
        Threshold of the noise-calibrated evaluation (see the module docs).
    n_bootstrap : int
        Bootstrap resamples of the completeness fit.

    Returns
    -------
    InjectionTest
    """
    if science.psf is None or template.psf is None:
        raise BadInputDataError("run_injection_test: science and template need PSF models "
                                "(diffim_dask.psf.estimate_psf)")
    config = config or InjectionConfig()
    if pipeline is not None:
        if subtract is not None or subtraction_config is not None:
            raise ConfigurationError("run_injection_test: give either pipeline or subtract / "
                                     "subtraction_config, not both")
        from ..workflow.pipeline import PipelineConfig, load_pipeline

        pipeline = pipeline if isinstance(pipeline, PipelineConfig) else load_pipeline(pipeline)
        subtract = _pipeline_subtract(pipeline)
        detection_config = detection_config if detection_config is not None else pipeline.detection
    subtract = subtract or _default_subtract(subtraction_config)
    science = science.compute()
    template = template.compute()
    cosmic_rays = None
    if pipeline is not None:
        # As in a survey run: cosmic rays are repaired once, before any injection.
        from ..workflow.run import repair_cosmic_rays

        science, cosmic_rays = repair_cosmic_rays(science, pipeline)
    baseline_sub = subtract(science, template)
    baseline = _real(_detect(baseline_sub, science, detection_config).catalog)
    placement = _avoiding(science, [baseline, known], radius)
    n_batches = max(1, math.ceil(n_sources / batch_size))
    truths, catalogs, rows, areas, last = [], [], [], {}, {}
    for batch in range(n_batches):
        start = time.perf_counter()
        count = min(batch_size, n_sources - batch * batch_size)
        # Positions are drawn away from the pair's own DIA sources and known sources (a source
        # injected onto one would be credited with its detection), then injected into the
        # untouched science image: the same seed reproduces the same pixels.
        chosen = inject_sources(placement, config.replace(n_sources=count), seed=seed + batch,
                                id_offset=batch * batch_size)
        injection: InjectionResult = inject_sources(
            science, chosen.truth[["injection_id", "x", "y", "flux_counts"]], seed=seed + batch,
            config=config)
        subtraction = subtract(injection.exposure, template)
        detection = _detect(subtraction, injection.exposure, detection_config)
        detector = int(science.info.detector)
        truth = injection.truth.assign(visit=batch, detector=detector,
                                       difference_snr=_difference_snr(injection.truth, detection))
        truths.append(truth)
        catalog = detection.catalog.assign(visit=batch, detector=detector)
        catalog["sky_snr_std"] = float(detection.metadata.get("sky_snr_std", math.nan))
        catalogs.append(catalog)
        areas[(batch, detector)] = exposure_area(detection.difference)
        matched, sources = match_injections(truth, catalog, radius, known=known)
        new = sources[~sources["near_truth"]]
        if len(new) and len(baseline):
            from scipy.spatial import cKDTree

            distance, _ = cKDTree(baseline[["x", "y"]].to_numpy(float)).query(
                new[["x", "y"]].to_numpy(float))
            n_new = int((distance > radius).sum())
        else:
            n_new = len(new)
        rows.append({"batch": batch, "seed": seed + batch, "n_injected": len(injection.truth),
                     "n_found": int(matched["found"].sum()), "n_sources": len(sources),
                     "n_false": len(new), "n_false_new": n_new,
                     "sky_snr_std": float(detection.metadata.get("sky_snr_std", math.nan)),
                     "noise_scale": float(injection.metadata["noise_scale"]),
                     "kernel_sum": float(subtraction.metadata.get("kernel_sum", math.nan)),
                     "time_s": round(time.perf_counter() - start, 3)})
        last = {"injection": injection, "subtraction": subtraction, "detection": detection}
    truth = pd.concat(truths, ignore_index=True)
    catalog = pd.concat(catalogs, ignore_index=True)
    matched, sources = match_injections(truth, catalog, radius, known=known)
    summary = summarize_injections(matched, sources, areas, n_bootstrap=n_bootstrap, seed=seed,
                                   n_images=n_batches)
    batches = pd.DataFrame(rows)
    metrics = dict(summary.metrics)
    metrics.update({"n_false_new": int(batches["n_false_new"].sum()),
                    "n_baseline_sources": int(len(baseline)),
                    "sky_snr_std": float(batches["sky_snr_std"].mean()),
                    "noise_scale": float(batches["noise_scale"].mean())})
    if cosmic_rays is not None:
        metrics.update(cosmic_rays)
    calibrated = None
    scale = catalog["sky_snr_std"].to_numpy(float)
    if np.isfinite(scale).all() and len(catalog):
        keep = catalog["isSky"].to_numpy(bool) | (
            np.abs(catalog["snr"].to_numpy(float)) / scale >= calibrated_threshold)
        matched_c, sources_c = match_injections(truth, catalog[keep], radius, known=known)
        calibrated = summarize_injections(matched_c, sources_c, areas, n_bootstrap=n_bootstrap,
                                          seed=seed, n_images=n_batches)
        metrics.update({f"{k}_calibrated": calibrated.metrics[k] for k in
                        ("snr50", "snr50_err", "snr90", "completeness", "n_false", "false_per_image",
                         "false_per_deg2")})
        metrics["difference_snr50_calibrated"] = _x50(calibrated.matched, "difference_snr", seed)
    metrics["difference_snr50"] = _x50(summary.matched, "difference_snr", seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = float(np.nanmedian(truth["expected_snr"].to_numpy(float)
                                    / truth["difference_snr"].to_numpy(float)))
    metrics["snr_loss_factor"] = factor
    metrics["snr50_ideal"] = calibrated_threshold * factor
    return InjectionTest(summary, calibrated, batches, baseline, last, metrics)


def _avoiding(science: Exposure, tables, radius: float) -> Exposure:
    """Copy of ``science`` with INJECTED set within ``radius`` of every (x, y) of ``tables``.

    Injection placement avoids INJECTED pixels (plus its own margin), so no
    injection lands on a source the pair already holds.
    """
    from ..masks import mask_value

    points = [t[["x", "y"]].to_numpy(float) for t in tables if t is not None and len(t)]
    if not points:
        return science
    image, variance, mask = science.arrays()
    x0, y0 = science.origin
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    near = np.zeros(mask.shape, bool)
    for x, y in np.concatenate(points):
        near |= (xx + x0 - x) ** 2 + (yy + y0 - y) ** 2 <= radius ** 2
    flagged = np.where(near, mask | np.uint32(mask_value(["INJECTED"])), mask)
    return science.with_planes(mask=flagged.astype(mask.dtype))


def _difference_snr(truth: pd.DataFrame, detection) -> np.ndarray:
    """S/N of each injection against the difference's variance, PSF and PSF-scale noise."""
    difference = detection.difference
    _, variance, mask = difference.arrays()
    scale = float(detection.metadata.get("sky_snr_std", math.nan))
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    per_count = psf_snr_per_count(difference.psf, variance.astype(np.float64), truth["x"], truth["y"],
                                  origin=difference.origin)
    return truth["flux_counts"].to_numpy(float) * per_count / scale


def _x50(matched: pd.DataFrame, column: str, seed: int) -> float:
    from .completeness import _try_fit

    fit = _try_fit(matched[column].to_numpy(float), matched["found"].to_numpy(bool), "snr", 0, seed)
    return fit.x50 if fit is not None else math.nan
