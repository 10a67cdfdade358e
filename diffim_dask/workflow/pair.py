"""``diffim-dask subtract``: difference two images and detect DIA sources.

The template is brought onto the science pixel grid with the same machinery as
survey templates (:func:`~diffim_dask.template.get_template`), through
:class:`SingleExposureStore`, which presents one exposure as a one-patch coadd
store on its own WCS. Without WCSs the two images must share one pixel grid.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from ..errors import BadInputDataError, ConfigurationError
from ..exposure import Exposure, grid_offset

__all__ = ["SingleExposureStore", "template_on_science_grid", "subtract_pair", "run_subtract_command"]


@dataclasses.dataclass(frozen=True)
class _SingleTract:
    wcs: object
    id: int = 0


class _SingleSkyMap:
    """The sky map of one image: one tract (its WCS), one patch (its box)."""

    def __init__(self, exposure: Exposure):
        from ..template import PatchInfo

        ny, nx = exposure.shape
        x0, y0 = exposure.origin
        box = (x0, y0, nx, ny)
        self._patch = PatchInfo(tract=0, id=0, index=(0, 0), inner_bbox=box, outer_bbox=box,
                                wcs=exposure.wcs)
        self._tract = _SingleTract(exposure.wcs)

    def patches_overlapping(self, wcs, shape, border=0.0, origin=(0, 0)):
        return [self._patch]

    def tract(self, tract_id: int):
        return self._tract


class SingleExposureStore:
    """One exposure presented as a coadd store with a single patch (tract 0, patch 0).

    Lets :func:`~diffim_dask.template.get_template` warp any template image
    onto a science grid, with the survey path's interpolation, mask spreading,
    variance propagation, coverage rules and PSF warping.
    """

    def __init__(self, exposure: Exposure, band: str):
        if exposure.wcs is None:
            raise BadInputDataError("the template has no WCS, so it cannot be warped")
        self.exposure = exposure.replace(info=exposure.info.replace(band=band))
        self.band = band
        self.skymap = _SingleSkyMap(exposure)

    def bands(self) -> list[str]:
        return [self.band]

    def patches(self, band: str, subfilter=None) -> list[tuple[int, int]]:
        return [(0, 0)] if band == self.band and subfilter is None else []

    def exists(self, band: str, tract: int, patch: int, subfilter=None) -> bool:
        return (band, tract, patch, subfilter) == (self.band, 0, 0, None)

    def open(self, band: str, tract: int, patch: int, *, subfilter=None, chunks=None) -> Exposure:
        return self.exposure


def _same_grid(science: Exposure, template: Exposure) -> bool:
    if science.shape != template.shape or science.origin != template.origin:
        return False
    return grid_offset(science, template) < 1e-3


def _check_geometry(science: Exposure, template: Exposure) -> None:
    """Fail fast (before any PSF work) when the pair cannot be put on one grid."""
    if (science.wcs is None or template.wcs is None) and science.shape != template.shape:
        have = "neither image has" if science.wcs is None and template.wcs is None else \
            "only one image has"
        raise BadInputDataError(
            f"{have} a WCS and their shapes differ (science {science.shape}, template "
            f"{template.shape}): cannot put the template on the science pixel grid")


def template_on_science_grid(science: Exposure, template: Exposure, config=None) -> tuple[Exposure, str]:
    """The template on the science pixel grid, and how it got there.

    Returns
    -------
    template : Exposure
    how : str
        ``"same grid"``, ``"same grid (no WCS)"`` or ``"warped"``.

    Raises
    ------
    BadInputDataError
        If only one image has a WCS and the shapes differ, or neither has one
        and the shapes differ.
    """
    _check_geometry(science, template)
    if science.wcs is None or template.wcs is None:
        return template.replace(wcs=science.wcs or template.wcs), "same grid (no WCS)"
    if _same_grid(science, template):
        return template, "same grid"
    from ..template import GetTemplateConfig, get_template

    band = science.info.band or template.info.band or "unknown"
    science_banded = science if science.info.band else science.replace(info=science.info.replace(band=band))
    result = get_template(science_banded, SingleExposureStore(template, band), config or GetTemplateConfig())
    return result.template, "warped"


def subtract_pair(science: Exposure, template: Exposure, pipeline):
    """Subtract and detect on one pair; returns ``(subtraction, detection, how)``."""
    from ..detect import detect_and_measure
    from ..psf import estimate_psf
    from .run import repair_cosmic_rays, subtract_exposures

    if science.info.band and template.info.band and science.info.band != template.info.band:
        raise ConfigurationError(f"band mismatch: science is {science.info.band!r}, template "
                                 f"{template.info.band!r}")
    _check_geometry(science, template)
    if science.psf is None:
        science = science.replace(psf=estimate_psf(science).psf)
    science, _ = repair_cosmic_rays(science, pipeline)
    if template.psf is None:
        template = template.replace(psf=estimate_psf(template).psf)
    template, how = template_on_science_grid(science, template, pipeline.template)
    subtraction = subtract_exposures(science, template, pipeline)
    detection = detect_and_measure(subtraction.difference, science=science,
                                   matched_template=subtraction.matched_image,
                                   score=subtraction.score, config=pipeline.detection)
    return subtraction, detection, how


def run_subtract_command(args) -> int:
    """Implementation of ``diffim-dask subtract``."""
    import pyarrow.parquet as pq

    from ..io import atomic_output_path, read_exposure, read_psf_fits, write_exposure_fits
    from ..masks import mask_value
    from ..subtract._stats import robust_sigma
    from .pipeline import load_pipeline
    from .run import read_fits_input

    pipeline = load_pipeline(args.config) if args.config else load_pipeline({})
    if args.method:
        pipeline = pipeline.replace(method=args.method, name=args.method)
    start = time.perf_counter()
    # Inputs may be local paths or fsspec URLs (copied to a private temporary file first).
    science_psf = read_fits_input(args.science_psf, read_psf_fits) if args.science_psf else None
    template_psf = read_fits_input(args.template_psf, read_psf_fits) if args.template_psf else None
    science = read_fits_input(args.science, lambda path: read_exposure(path, psf=science_psf))
    template = read_fits_input(args.template, lambda path: read_exposure(path, psf=template_psf))
    subtraction, detection, how = subtract_pair(science, template, pipeline)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_exposure_fits(detection.difference, out / "difference.fits", overwrite=True)
    if detection.score is not None:
        write_exposure_fits(detection.score, out / "score.fits", overwrite=True)
    with atomic_output_path(out / "diaSources.parquet", overwrite=True) as temporary:
        pq.write_table(detection.to_arrow(), temporary)

    image, variance, mask = detection.difference.arrays()
    good = (variance > 0) & ((mask & np.uint32(mask_value(["NO_DATA", "BAD", "SAT", "EDGE", "DETECTED",
                                                            "DETECTED_NEGATIVE"]))) == 0)
    normalised = image[good] / np.sqrt(variance[good])
    catalog = detection.catalog[~detection.catalog["isSky"]]
    meta = subtraction.metadata
    print(f"diffim-dask subtract ({pipeline.method}): template {how}; "
          f"{time.perf_counter() - start:.1f} s")
    if "kernel_sum" in meta:
        print(f"  kernel sum {meta['kernel_sum']:.4f}; PSF FWHM science "
              f"{science.psf.fwhm(*science.center):.2f} px, template {template.psf.fwhm(*template.center):.2f} px"
              if science.psf is not None and template.psf is not None else
              f"  kernel sum {meta['kernel_sum']:.4f}")
    print(f"  difference noise: robust sigma of D/sqrt(var) = {robust_sigma(normalised[np.isfinite(normalised)]):.3f} "
          f"(1 for a well-calibrated variance plane)")
    print(f"  DIA sources: {len(catalog)} ({int((~catalog['isNegative']).sum())} positive, "
          f"{int(catalog['isNegative'].sum())} negative, {int(catalog['isDipole'].sum())} dipoles)")
    top = catalog.reindex(catalog["snr"].abs().sort_values(ascending=False).index).head(10)
    if len(top):
        print("      x        y      snr     psfFlux  dipole")
        for r in top.itertuples():
            print(f"  {r.x:7.1f}  {r.y:7.1f}  {r.snr:7.1f}  {r.psfFlux:10.1f}  {bool(r.isDipole)}")
    written = ["difference.fits", "diaSources.parquet"] + (["score.fits"] if detection.score is not None else [])
    print(f"  wrote {', '.join(written)} in {out}/")
    return 0
