"""Alard–Lupton PSF-matching subtraction (with decorrelation and a score variant).

Public API
----------
subtract_alard_lupton(science, template, config=None, sources=None) -> SubtractionResult
subtract_alard_lupton_preconvolved(science, template, config=None, sources=None)
    -> SubtractionResult (with ``score``)
AlardLuptonConfig and its nested configs; SpatialKernel, SpatialBackground, ChebyshevBasis2D;
make_basis / basis_sigmas / kernel_size_for_sigmas (the kernel basis);
measure_variance_scale; decorrelation_kernel / noise_power_spectrum /
noise_correlation_factor / psf_flux_bias / score_kernel.
"""

from ._basis import KernelBasis, basis_sigmas, kernel_size_for_sigmas, make_basis
from ._spatial import ChebyshevBasis2D
from .alard_lupton import subtract_alard_lupton, subtract_alard_lupton_preconvolved
from .config import (AlardLuptonConfig, DecorrelationConfig, KernelBasisConfig, KernelFitConfig,
                     KernelSourceConfig, QualityGateConfig, VarianceScalingConfig)
from .decorrelation import (NOISE_POWER_FLOOR, decorrelation_kernel, noise_correlation_factor,
                            noise_power_spectrum, psf_flux_bias, score_kernel)
from .kernel import SpatialBackground, SpatialKernel
from .result import SubtractionResult
from .variance import VarianceScale, measure_variance_scale

__all__ = [
    "subtract_alard_lupton",
    "subtract_alard_lupton_preconvolved",
    "SubtractionResult",
    "AlardLuptonConfig",
    "KernelBasisConfig",
    "KernelSourceConfig",
    "KernelFitConfig",
    "VarianceScalingConfig",
    "DecorrelationConfig",
    "QualityGateConfig",
    "SpatialKernel",
    "SpatialBackground",
    "ChebyshevBasis2D",
    "KernelBasis",
    "make_basis",
    "basis_sigmas",
    "kernel_size_for_sigmas",
    "measure_variance_scale",
    "VarianceScale",
    "decorrelation_kernel",
    "NOISE_POWER_FLOOR",
    "noise_power_spectrum",
    "noise_correlation_factor",
    "psf_flux_bias",
    "score_kernel",
]
