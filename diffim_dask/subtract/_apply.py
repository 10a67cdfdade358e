"""Applying a fitted kernel block by block: matched image, difference, variance, mask.

Every function here is a pure numpy function of one block plus its global
offset, run through :func:`diffim_dask.chunking.map_overlap_2d` with a halo
from :func:`diffim_dask.chunking.halo_for_kernels`, so a dask-chunked image gives
the same pixels as the whole array.

Notation: ``Y`` is the image matched to (science for ``convolveTemplate``),
``X`` the convolved image; the matched image is ``M = s_x (X ⊗ K)`` and the
difference ``D = σ (s_y Y − M) [− background]`` with ``σ = +1, s_y = s_x = 1``
for ``convolveTemplate`` and ``σ = −1, s_y = s_x = 1/κ_Σ`` for
``convolveScience`` (so ``D = S ⊗ K/κ_Σ − T/κ_Σ`` is in science flux units).
A filter set (decorrelation or score correction, possibly one per grid node,
blended bilinearly) is then applied to ``D``; variances are propagated with
the kernels actually applied.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..chunking import halo_for_kernels, map_overlap_2d
from ..masks import MASK_DTYPE, mask_value
from ._convolve import (convolve_spatial, dilate_bits, fft_convolve_same, quadratic_form_grid)

__all__ = []

_EDGE = mask_value("EDGE")
_NO_DATA = mask_value("NO_DATA")


@dataclasses.dataclass(frozen=True, eq=False)
class FilterNodes:
    """Filters applied after differencing, one set per grid node (bilinear blending).

    Attributes
    ----------
    x_nodes, y_nodes : numpy.ndarray
        Node positions (parent frame) along each axis; nodes form their outer product.
    image_kernels : numpy.ndarray
        ``(n_y, n_x, f, f)`` filters applied to the difference.
    ref_var_kernels : numpy.ndarray
        ``(n_y, n_x, a, a)`` effective kernels acting on the reference image's
        noise (their squares convolve ``V_Y``).
    conv_var_kernels : numpy.ndarray
        ``(n_y, n_x, g, g)`` effective kernels acting on the convolved image's
        noise at the node (matching kernel there, then the filter).
    conv_var_grams : numpy.ndarray
        ``(n_y, n_x, n_terms, n_terms)``: ``Σ P_s P_t G_st`` is the squared norm of
        the effective kernel at any position; divided by the node's value it
        rescales ``V_X ⊗ g²`` for the kernel's spatial variation.
    """

    x_nodes: np.ndarray
    y_nodes: np.ndarray
    image_kernels: np.ndarray
    ref_var_kernels: np.ndarray
    conv_var_kernels: np.ndarray
    conv_var_grams: np.ndarray

    @property
    def image_half(self) -> int:
        return self.image_kernels.shape[-1] // 2

    @property
    def var_half(self) -> int:
        return max(self.ref_var_kernels.shape[-1], self.conv_var_kernels.shape[-1]) // 2


def tent_weights(coords: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Piecewise-linear partition of unity over ``nodes`` (constant beyond the ends)."""
    if len(nodes) == 1:
        return np.ones((1, coords.size))
    eye = np.eye(len(nodes))
    return np.array([np.interp(coords, nodes, eye[i]) for i in range(len(nodes))])


def _node_weights(nodes: FilterNodes, offset, shape, origin):
    y = origin[1] + offset[0] + np.arange(shape[0], dtype=float)
    x = origin[0] + offset[1] + np.arange(shape[1], dtype=float)
    wy = tent_weights(y, nodes.y_nodes)
    wx = tent_weights(x, nodes.x_nodes)
    out = []
    for j in range(len(nodes.y_nodes)):
        if not wy[j].any():
            continue
        for i in range(len(nodes.x_nodes)):
            if wx[i].any():
                out.append((j, i, wy[j].astype(np.float32), wx[i].astype(np.float32)))
    return out


def _convolve_one(image, kernel, workers, dtype=np.float32):
    if kernel.shape == (1, 1):
        return image * image.dtype.type(kernel[0, 0])
    (out,) = fft_convolve_same(image, [kernel], workers=workers, dtype=dtype)
    return out


def _add_edge(mask, offset, full_shape, width):
    """Set EDGE (in place) on pixels closer than ``width`` to the full image's border."""
    if width <= 0:
        return mask
    ny, nx = mask.shape
    y0, x0 = offset
    edge = MASK_DTYPE(_EDGE)
    top = max(0, min(ny, width - y0))
    bottom = max(0, min(ny, full_shape[0] - width - y0))
    left = max(0, min(nx, width - x0))
    right = max(0, min(nx, full_shape[1] - width - x0))
    mask[:top] |= edge
    mask[bottom:] |= edge
    mask[:, :left] |= edge
    mask[:, right:] |= edge
    return mask


# -- block functions ------------------------------------------------------------------------------


def fill_bad(image, mask, bits: int, value: float):
    """Replace pixels with ``bits`` (or non-finite) by ``value`` (a copy only when needed)."""
    bad = (mask & MASK_DTYPE(bits)) != 0
    bad |= ~np.isfinite(image)
    if not bad.any():
        return image.astype(np.float32, copy=False)
    return np.where(bad, np.float32(value), image).astype(np.float32, copy=False)


def _matched_block(image, mask, *, offset, term_kernels, spatial, origin, fill_bits, fill_value,
                   scale, workers, fft_dtype):
    filled = fill_bad(image, mask, fill_bits, fill_value)
    out = convolve_spatial(filled, term_kernels * scale, spatial, offset=offset, origin=origin,
                           workers=workers, dtype=fft_dtype)
    return out


def _preconvolve_block(image, mask, *, offset, kernel, fill_bits, fill_value, workers, fft_dtype):
    del offset
    out = _convolve_one(fill_bad(image, mask, fill_bits, fill_value), kernel, workers, fft_dtype)
    return out.astype(np.float32, copy=False)


def _dilate_block(x_mask, *, offset, dilate_half, dilate_planes, keep_planes):
    """``dilate(x_mask)`` over the kernel footprint; ``keep_planes`` copied undilated."""
    del offset
    grown = dilate_bits(x_mask, dilate_half, dilate_planes)
    grown &= MASK_DTYPE((dilate_planes | keep_planes) & 0xFFFFFFFF)
    return grown


def _or_block(a, b, *, offset, full_shape, edge_width):
    out = a.copy() if b is None else a | b
    return _add_edge(out, offset, full_shape, edge_width)


def _combined_mask(masks, offset, full_shape, edge_width):
    """OR of the source masks plus EDGE (computed per block, never a separate dask layer)."""
    out = masks[0].copy()
    for mask in masks[1:]:
        out |= mask
    return _add_edge(out, offset, full_shape, edge_width)


def _difference_block(reference, matched, *masks, offset, origin, sign, scale_reference,
                      background, zero_bits, nodes, workers, fft_dtype, full_shape, edge_width):
    mask = _combined_mask(masks, offset, full_shape, edge_width)
    # The difference is formed and filtered in the FFT precision, stored as float32.
    diff = reference.astype(fft_dtype)
    if scale_reference != 1:
        diff *= fft_dtype(scale_reference)
    diff -= matched
    if sign < 0:
        np.negative(diff, out=diff)
    if background is not None:
        diff = diff - background.image(diff.shape, origin, offset=offset)
    zero = (mask & MASK_DTYPE(zero_bits)) != 0
    zero |= ~np.isfinite(diff)
    diff[zero] = 0
    del zero
    if nodes is None:
        out = diff
    else:
        weights = _node_weights(nodes, offset, diff.shape, origin)
        out = None
        for j, i, wy, wx in weights:
            filtered = _convolve_one(diff, nodes.image_kernels[j, i], workers, fft_dtype)
            if len(weights) > 1:
                filtered *= wy[:, None]
                filtered *= wx[None, :]
            if out is None:
                out = filtered
            else:
                out += filtered
    out[(mask & MASK_DTYPE(_NO_DATA)) != 0] = 0
    return out.astype(np.float32, copy=False)


def _variance_block(var_reference, var_convolved, *masks, offset, origin, nodes, spatial,
                    scale_reference, scale_convolved, propagation, workers, fft_dtype):
    # Inputs are sanitised upstream (non-finite pixels are NO_DATA with variance 0).
    weights = _node_weights(nodes, offset, var_reference.shape, origin)
    out = None if len(weights) == 1 else np.zeros(var_reference.shape, np.float32)
    for j, i, wy, wx in weights:
        ref_kernel = nodes.ref_var_kernels[j, i]
        conv_kernel = nodes.conv_var_kernels[j, i]
        node_norm2 = float((conv_kernel**2).sum())
        # conv_part = s_x² (V_X ⊗ g²) · ‖K(x,y) ⊗ f‖² / ‖g‖²
        # (pointwise: s_x² V_X ‖K(x,y) ⊗ f‖²)
        if scale_convolved != 0:
            if propagation == "pointwise":
                value = quadratic_form_grid(nodes.conv_var_grams[j, i] * scale_convolved**2,
                                            spatial, offset=offset, shape=var_reference.shape,
                                            origin=origin)
                value *= var_convolved
            else:
                value = quadratic_form_grid(
                    nodes.conv_var_grams[j, i] * (scale_convolved**2 / node_norm2), spatial,
                    offset=offset, shape=var_reference.shape, origin=origin)
                value *= _convolve_one(var_convolved, conv_kernel**2, workers, fft_dtype)
        else:
            value = np.zeros(var_reference.shape, np.float32)
        if scale_reference != 0:
            if propagation == "pointwise":
                # value += c V_Y without an image-sized temporary: (value / c + V_Y) c.
                factor = np.float32(scale_reference**2 * (ref_kernel**2).sum())
                if factor > 0:
                    value *= np.float32(1.0) / factor
                    value += var_reference
                    value *= factor
            else:
                ref_part = _convolve_one(var_reference, ref_kernel**2, workers, fft_dtype)
                ref_part *= np.float32(scale_reference**2)
                value += ref_part
        if out is None:
            out = value
            continue
        value *= wy[:, None]
        value *= wx[None, :]
        out += value
    np.maximum(out, 0, out=out)
    for mask in masks:
        np.copyto(out, np.float32(0), where=(mask & MASK_DTYPE(_NO_DATA)) != 0)
    return out


def _score_block(score, variance, *masks, offset):
    mask = _combined_mask(masks, offset, None, 0)
    good = (variance > 0) & np.isfinite(score) & ((mask & MASK_DTYPE(_NO_DATA)) == 0)
    return np.where(good, score / np.sqrt(np.where(good, variance, 1)), 0).astype(np.float32)


# -- drivers ---------------------------------------------------------------------------------
#
# Every driver runs its block function through map_overlap_2d (whole numpy array or dask
# chunks with a halo) or, with ``block_offset``, directly on numpy cut-outs whose first pixel
# sits at that global (y, x) index — used to evaluate the outputs at a few stars only.


def _run(func, *arrays, depth, dtype, block_offset=None, **kwargs):
    if block_offset is not None:
        return np.asarray(func(*arrays, offset=block_offset, **kwargs), dtype=dtype)
    return map_overlap_2d(func, *arrays, depth=depth, dtype=dtype, **kwargs)


def convolve_image(image, mask, *, kernel, origin, fill_bits, fill_value, scale, workers,
                   fft_dtype=np.float64, block_offset=None):
    """``scale · (filled image ⊗ K(x, y))`` on numpy or dask arrays."""
    return _run(_matched_block, image, mask, depth=halo_for_kernels(kernel.size),
                dtype=np.float32, block_offset=block_offset, term_kernels=kernel.term_kernels(),
                spatial=kernel.spatial, origin=origin, fill_bits=fill_bits,
                fill_value=fill_value, scale=scale, workers=workers, fft_dtype=fft_dtype)


def preconvolve_image(image, mask, *, kernel, fill_bits, fill_value, workers,
                      fft_dtype=np.float64, block_offset=None):
    """Filled image convolved with a constant kernel."""
    return _run(_preconvolve_block, image, mask, depth=halo_for_kernels(kernel.shape[0]),
                dtype=np.float32, block_offset=block_offset, kernel=kernel, fill_bits=fill_bits,
                fill_value=fill_value, workers=workers, fft_dtype=fft_dtype)


def dilate_mask(x_mask, *, dilate_half, dilate_planes, keep_planes, block_offset=None):
    """Mask of the convolved image: planes dilated by the kernel footprint (numpy or dask)."""
    return _run(_dilate_block, x_mask, depth=max(dilate_half, 0), dtype=MASK_DTYPE,
                block_offset=block_offset, dilate_half=dilate_half,
                dilate_planes=dilate_planes, keep_planes=keep_planes)


def or_masks(a, b, *, full_shape, edge_width, block_offset=None):
    """``a | b`` plus EDGE within ``edge_width`` of the border (numpy or dask)."""
    arrays = (a,) if b is None else (a, b)

    def function(*blocks, offset, full_shape, edge_width):
        return _or_block(blocks[0], blocks[1] if len(blocks) > 1 else None, offset=offset,
                         full_shape=full_shape, edge_width=edge_width)

    return _run(function, *arrays, depth=0, dtype=MASK_DTYPE, full_shape=full_shape,
                edge_width=edge_width, block_offset=block_offset)


def difference_image(reference, matched, masks, *, origin, sign, scale_reference, background,
                     zero_bits, nodes, workers, full_shape, edge_width, fft_dtype=np.float64,
                     block_offset=None):
    """Filtered difference on numpy or dask arrays.

    ``masks`` are the source masks (ORed per block, plus EDGE within
    ``edge_width``): output planes never depend on another output plane, which
    keeps ``dask.compute(dataset)`` clear of pydata/xarray#11329.
    """
    depth = nodes.image_half if nodes is not None else 0
    return _run(_difference_block, reference, matched, *masks, depth=depth, dtype=np.float32,
                block_offset=block_offset, origin=origin, sign=sign,
                scale_reference=scale_reference, background=background, zero_bits=zero_bits,
                nodes=nodes, workers=workers, fft_dtype=fft_dtype, full_shape=full_shape,
                edge_width=edge_width)


def propagate_variance(var_reference, var_convolved, masks, *, origin, nodes, spatial,
                       scale_reference, scale_convolved, propagation, workers,
                       fft_dtype=np.float64, block_offset=None):
    """Variance plane of a (filtered) difference or matched image on numpy or dask arrays.

    ``masks``: source masks; pixels with NO_DATA in any of them get variance 0.
    """
    depth = nodes.var_half if propagation == "convolve" else 0
    return _run(_variance_block, var_reference, var_convolved, *masks, depth=depth,
                dtype=np.float32, block_offset=block_offset, origin=origin, nodes=nodes,
                spatial=spatial, scale_reference=scale_reference,
                scale_convolved=scale_convolved, propagation=propagation, workers=workers,
                fft_dtype=fft_dtype)


def normalise_score(score, variance, masks, block_offset=None):
    """Score / sqrt(variance) on numpy or dask arrays (``masks``: source masks)."""
    return _run(_score_block, score, variance, *masks, depth=0, dtype=np.float32,
                block_offset=block_offset)
