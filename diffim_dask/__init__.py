"""diffim_dask: survey-scale difference image analysis on Dask.

The public API is re-exported here; see the README for the three stages
(template assembly, subtraction, detection and measurement).
"""

from ._version import __version__
from .config import ConfigBase, config_field, describe_config
from .errors import (
    AlgorithmError,
    BadInputDataError,
    BadSubtractionError,
    ConfigurationError,
    DiffimError,
    InsufficientKernelSourcesError,
    NoWorkFound,
    TransientIOError,
    classify_error,
)
from .exposure import Exposure, PhotoCalib, VisitInfo
from .masks import MASK_PLANES, mask_value, plane_set
from .psf import GaussianPsf, GridPsf, ImagePsf, MoffatPsf, PolynomialPsf, PsfModel, psf_from_dict

__all__ = [
    "__version__",
    "ConfigBase",
    "config_field",
    "describe_config",
    "AlgorithmError",
    "BadInputDataError",
    "BadSubtractionError",
    "ConfigurationError",
    "DiffimError",
    "InsufficientKernelSourcesError",
    "NoWorkFound",
    "TransientIOError",
    "classify_error",
    "Exposure",
    "PhotoCalib",
    "VisitInfo",
    "MASK_PLANES",
    "mask_value",
    "plane_set",
    "GaussianPsf",
    "GridPsf",
    "ImagePsf",
    "MoffatPsf",
    "PolynomialPsf",
    "PsfModel",
    "psf_from_dict",
]
