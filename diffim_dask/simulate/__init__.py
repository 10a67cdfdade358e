"""Deterministic survey simulator: sky, visits, template patches, transients and truth.

The public entry points:

* :class:`SurveyConfig` — every knob, documented;
* :func:`make_sky` / :class:`SkyModel` — the static sky (stars, variables, galaxies) in
  RA/Dec and nJy;
* :class:`Survey` — visits × detectors (:meth:`Survey.simulate_visit`) and template
  patches (:meth:`Survey.simulate_template_patch`), each a :class:`SimulatedImage`
  (an :class:`~diffim_dask.exposure.Exposure` with its true PSF, plus a truth table);
* :func:`simulate_pair` / :class:`SimulatedPair` — a science/template pair on one pixel
  grid for algorithm tests.

Examples
--------
>>> from diffim_dask.simulate import Survey, SurveyConfig
>>> survey = Survey(SurveyConfig(seed=7, n_visits=2, detector_shape=(256, 256)))
>>> image = survey.simulate_visit(1, 0)
>>> sorted(set(image.truth["kind"])) # doctest: +SKIP
['cosmic_ray', 'galaxy', 'star', 'transient', 'variable']
"""

from .config import SurveyConfig
from .geometry import PatchInfo, Tract, focal_plane_origins, tangent_wcs
from .pair import SimulatedPair, simulate_pair
from .profiles import sersic_mixture
from .render import point_source_norms
from .sky import SkyModel, draw_sky, make_sky, power_law_fluxes, variable_flux
from .survey import (
    TRUTH_COLUMNS,
    SimulatedImage,
    Survey,
    VisitSpec,
    fwhm_variation_coefficients,
    make_psf,
    survey_tract,
    visit_spec,
)

__all__ = [
    "SurveyConfig",
    "SkyModel",
    "make_sky",
    "draw_sky",
    "power_law_fluxes",
    "variable_flux",
    "Survey",
    "SimulatedImage",
    "VisitSpec",
    "visit_spec",
    "survey_tract",
    "make_psf",
    "fwhm_variation_coefficients",
    "TRUTH_COLUMNS",
    "PatchInfo",
    "Tract",
    "tangent_wcs",
    "focal_plane_origins",
    "SimulatedPair",
    "simulate_pair",
    "sersic_mixture",
    "point_source_norms",
]
