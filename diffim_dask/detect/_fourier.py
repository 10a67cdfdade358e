"""Fourier-space PSF models: sub-pixel shifted points and trailed (segment-convolved) PSFs.

The PSF is rendered once at the source position, its FFT kept, and every
model evaluation of a nonlinear fit is one inverse FFT:

.. math::

    \\hat m(\\mathbf k) = \\hat P(\\mathbf k)\\, e^{-2\\pi i \\mathbf k\\cdot\\mathbf c}
        \\operatorname{sinc}(\\mathbf k\\cdot\\mathbf v),

a PSF centred at ``c`` convolved with a uniform segment of vector ``v``
(``v = 0`` gives a point source; ``sinc(z) = sin(πz)/(πz)``). The pixelized PSF
is treated as band-limited, which is accurate for PSFs with FWHM ≳ 2 pixels.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from ..psf.models import PsfModel

__all__ = ["FourierPsf"]


class FourierPsf:
    """A PSF ready for fast shifted / trailed rendering on a ``box_shape`` box.

    Parameters
    ----------
    psf : PsfModel
        The PSF model.
    x, y : float
        Parent-frame position where the PSF is evaluated.
    box_shape : (int, int)
        Shape of the data box the models are compared with.
    max_size : int
        Largest PSF stamp side used (odd); the PSF light outside it is
        accounted for, so models keep total flux normalisation.
    """

    def __init__(self, psf: PsfModel, x: float, y: float, box_shape, max_size: int = 61):
        full = psf.image(x, y)
        size = min(full.shape[0], max_size | 1)
        lo = (full.shape[0] - size) // 2
        stamp = full[lo:lo + size, lo:lo + size] / full.sum()
        self.box_shape = (int(box_shape[0]), int(box_shape[1]))
        grid = tuple(sfft.next_fast_len(n + size, real=True) for n in self.box_shape)
        work = np.zeros(grid)
        half = size // 2
        # Centre of the PSF at index (0, 0), wrapped around.
        work[:size, :size] = stamp
        work = np.roll(work, (-half, -half), axis=(0, 1))
        self.grid = grid
        self.transform = sfft.rfft2(work)
        self.ky = sfft.fftfreq(grid[0])[:, None]
        self.kx = sfft.rfftfreq(grid[1])[None, :]

    def model_with_gradient(self, cx: float, cy: float):
        """Unit-flux point model at ``(cx, cy)`` and its derivatives with respect to cx, cy."""
        spectrum = self.transform * np.exp(-2j * np.pi * (self.kx * cx + self.ky * cy))
        ny, nx = self.box_shape
        # d/dc multiplies the spectrum by -2 pi i k (the Nyquist terms carry no phase slope).
        kx = np.where(np.abs(self.kx) < 0.5, self.kx, 0.0)
        ky = np.where(np.abs(self.ky) < 0.5, self.ky, 0.0)
        stack = np.stack([spectrum, spectrum * (-2j * np.pi * kx), spectrum * (-2j * np.pi * ky)])
        images = sfft.irfft2(stack, s=self.grid, axes=(-2, -1))
        return images[0, :ny, :nx], images[1, :ny, :nx], images[2, :ny, :nx]

    def model(self, cx: float, cy: float, vx: float = 0.0, vy: float = 0.0) -> np.ndarray:
        """Unit-flux model on the box: PSF at ``(cx, cy)`` (box pixels) ⊗ segment ``v``."""
        phase = np.exp(-2j * np.pi * (self.kx * cx + self.ky * cy))
        spectrum = self.transform * phase
        if vx != 0.0 or vy != 0.0:
            spectrum = spectrum * np.sinc(self.kx * vx + self.ky * vy)
        image = sfft.irfft2(spectrum, s=self.grid)
        return image[:self.box_shape[0], :self.box_shape[1]]
