"""PSF models and PSF estimation."""

from .estimate import PsfEstimate, PsfEstimationConfig, estimate_psf
from .models import (
    FWHM_PER_SIGMA,
    GaussianPsf,
    GridPsf,
    ImagePsf,
    MoffatPsf,
    PolynomialPsf,
    PsfModel,
    fwhm_of_stamp,
    psf_from_dict,
)

__all__ = [
    "FWHM_PER_SIGMA",
    "GaussianPsf",
    "GridPsf",
    "ImagePsf",
    "MoffatPsf",
    "PolynomialPsf",
    "PsfEstimate",
    "PsfEstimationConfig",
    "PsfModel",
    "estimate_psf",
    "fwhm_of_stamp",
    "psf_from_dict",
]
