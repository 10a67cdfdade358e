"""The named result of an Alard–Lupton subtraction."""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from ..exposure import Exposure
from .kernel import SpatialBackground, SpatialKernel

__all__ = ["SubtractionResult"]


@dataclasses.dataclass(frozen=True, eq=False)
class SubtractionResult:
    """Outputs of :func:`~diffim_dask.subtract.subtract_alard_lupton` and its score variant.

    Attributes
    ----------
    difference : Exposure
        The difference image (decorrelated unless disabled), in the science
        image's flux units. Its PSF is that of the unconvolved image (science
        for ``convolveTemplate``, template for ``convolveScience``), convolved
        with the decorrelation filter when the filter changes PSF fluxes by more
        than ``DecorrelationConfig.psf_bias_tolerance`` (``metadata
        ["difference_psf"]`` says which). For the score variant: the
        preconvolved difference ``science ⊗ P̄ − template ⊗ K``.
    matched_image : Exposure
        The convolved input after matching: the matched template
        (``convolveTemplate``, score variant) or the matched science image
        divided by the kernel sum (``convolveScience``).
    kernel : SpatialKernel
        The PSF-matching kernel, evaluable at any ``(x, y)``.
    background : SpatialBackground
        The fitted differential background, in the difference image's units.
    kernel_sources : pandas.DataFrame
        Stars (or all-pixels tiles) considered for the kernel, with per-source
        statistics and a ``status`` / ``used`` column.
    score : Exposure or None
        Score variant only: per-pixel point-source matched-filter S/N (unit
        variance in pure noise; the variance plane is 1 where valid).
    metadata : dict
        Diagnostics: direction, basis, kernel sum and its spread, source counts,
        residual statistics, condition number, variance factors, quality metrics,
        time per step.
    """

    difference: Exposure
    matched_image: Exposure
    kernel: SpatialKernel
    background: SpatialBackground
    kernel_sources: pd.DataFrame
    score: Exposure | None
    metadata: dict[str, Any]

    @property
    def matched_template(self) -> Exposure:
        """Alias of :attr:`matched_image` (the anchor's name for the default direction)."""
        return self.matched_image
