"""Cutout triplets: science / template / difference stamps of DIA sources, as PNG and alert-style FITS.

:func:`extract_cutout` cuts a square stamp (odd side, centred on the pixel
nearest the position) out of an exposure, NaN-padded and flagged ``NO_DATA``
beyond the image edge; lazy exposures read only the stamp's pixels.
:func:`cutout_triplet` does so on the three images of a subtraction.

Display
    The three stamps share one stretch, so a residual reads against the
    source it came from: each stamp has its own sky (the median of its border
    pixels) removed, then all use ``asinh(v / a) / asinh(v_max / a)`` with the
    softening ``a = 2σ`` (σ: the science stamp's median noise) and ``v_max``
    the largest 99.5th percentile of the three (at least ``10σ``), shifted so
    that ``-3σ`` is black: ``asinh((v + 3σ)/a) / asinh((v_max + 3σ)/a)``; the
    empty sky is mid-grey and negative residuals show dark.

Alert packets
    :func:`cutout_to_fits` writes a stamp as gzip-compressed FITS (image with
    the stamp's WCS in the primary HDU, VARIANCE and MASK extensions, the
    parent-frame position in ``LTV1``/``LTV2`` and ``XPOS``/``YPOS``), the
    form alert streams carry (ZTF, Rubin); :func:`add_cutout_columns` embeds
    the three stamps of each DIA source as binary catalog columns
    ``cutoutScience``, ``cutoutTemplate``, ``cutoutDifference``.

Plotting needs matplotlib (the ``plot`` extra), imported on first use with
the non-interactive Agg backend.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigurationError
from ..exposure import Exposure
from ..masks import MASK_DTYPE, mask_value

__all__ = [
    "Cutout",
    "CutoutTriplet",
    "extract_cutout",
    "cutout_triplet",
    "triplet_stretch",
    "triplet_figure",
    "figure_png",
    "write_triplet_png",
    "cutout_to_fits",
    "cutout_from_fits",
    "add_cutout_columns",
    "select_gallery",
    "write_cutout_pngs",
    "CUTOUT_COLUMNS",
]

#: Binary catalog columns holding the gzip-compressed FITS stamps.
CUTOUT_COLUMNS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")
_PANELS = ("science", "template", "difference")


@dataclasses.dataclass(frozen=True, eq=False)
class Cutout:
    """A square stamp of an exposure.

    Attributes
    ----------
    image, variance : numpy.ndarray
        float32 planes, NaN beyond the parent image.
    mask : numpy.ndarray
        uint32 planes, ``NO_DATA`` beyond the parent image.
    x0, y0 : int
        Parent-frame position of ``image[0, 0]``.
    x, y : float
        The requested centre (parent frame).
    wcs : astropy.wcs.WCS or None
        The stamp's WCS (the parent WCS with its reference pixel shifted).
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    x0: int
    y0: int
    x: float
    y: float
    wcs: Any = None

    @property
    def size(self) -> int:
        """Side in pixels."""
        return int(self.image.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class CutoutTriplet:
    """Science, template and difference stamps of one position, with a description."""

    science: Cutout
    template: Cutout | None
    difference: Cutout
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def panels(self) -> list[tuple[str, Cutout | None]]:
        """``[("science", ...), ("template", ...), ("difference", ...)]``."""
        return [(name, getattr(self, name)) for name in _PANELS]


def _shift_wcs(wcs, x0: int, y0: int):
    if wcs is None:
        return None
    shifted = copy.deepcopy(wcs)
    shifted.wcs.crpix = shifted.wcs.crpix - np.array([x0, y0], dtype=float)
    if getattr(shifted, "sip", None) is not None:
        shifted.sip = type(shifted.sip)(shifted.sip.a, shifted.sip.b, shifted.sip.ap, shifted.sip.bp,
                                        shifted.wcs.crpix)
    return shifted


def extract_cutout(exposure: Exposure, x: float, y: float, size: int = 31) -> Cutout:
    """Square stamp of ``size`` pixels centred on the pixel nearest ``(x, y)`` (parent frame).

    Parameters
    ----------
    exposure : Exposure
        Numpy- or dask-backed (only the stamp's pixels are read).
    x, y : float
        Parent-frame position.
    size : int
        Odd side in pixels.

    Returns
    -------
    Cutout

    Raises
    ------
    ConfigurationError
        If ``size`` is not a positive odd integer.
    """
    size = int(size)
    if size < 1 or size % 2 == 0:
        raise ConfigurationError(f"cutout size must be a positive odd integer, got {size}")
    half = size // 2
    ex0, ey0 = exposure.origin
    ny, nx = exposure.shape
    cx, cy = int(math.floor(x + 0.5)), int(math.floor(y + 0.5))
    x0, y0 = cx - half, cy - half
    image = np.full((size, size), np.nan, dtype=np.float32)
    variance = np.full((size, size), np.nan, dtype=np.float32)
    mask = np.full((size, size), mask_value("NO_DATA"), dtype=MASK_DTYPE)
    # Overlap of the stamp with the image, in the image's array indices.
    ia, ib = max(x0 - ex0, 0), min(x0 - ex0 + size, nx)
    ja, jb = max(y0 - ey0, 0), min(y0 - ey0 + size, ny)
    if ia < ib and ja < jb:
        part = exposure.dataset.isel(x=slice(ia, ib), y=slice(ja, jb))
        if exposure.is_lazy:
            part = part.compute()
        sa, sb = ja - (y0 - ey0), jb - (y0 - ey0)
        ta, tb = ia - (x0 - ex0), ib - (x0 - ex0)
        image[sa:sb, ta:tb] = part["image"].values
        variance[sa:sb, ta:tb] = part["variance"].values
        mask[sa:sb, ta:tb] = part["mask"].values
    return Cutout(image, variance, mask, x0, y0, float(x), float(y), _shift_wcs(exposure.wcs, x0, y0))


def cutout_triplet(science: Exposure, template: Exposure | None, difference: Exposure, x: float,
                   y: float, size: int = 31, **info: Any) -> CutoutTriplet:
    """Stamps of the same position on the science, template (optional) and difference images.

    Extra keyword arguments are kept in :attr:`CutoutTriplet.info` (e.g.
    ``diaSourceId``, ``snr``, ``kind``) and used as the plot's row title.
    """
    return CutoutTriplet(
        extract_cutout(science, x, y, size),
        extract_cutout(template, x, y, size) if template is not None else None,
        extract_cutout(difference, x, y, size),
        dict(info, x=float(x), y=float(y)),
    )


# ----------------------------------------------------------------------------------------------
# Display
# ----------------------------------------------------------------------------------------------


def _border_sky(image: np.ndarray) -> float:
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    border = border[np.isfinite(border)]
    return float(np.median(border)) if border.size else 0.0


def triplet_stretch(triplet: CutoutTriplet) -> dict[str, float]:
    """The common stretch of a triplet (see the module docs).

    Returns
    -------
    dict
        ``sigma`` (science stamp noise), ``softening``, ``vmin``, ``vmax`` and
        the per-panel ``sky_<panel>`` removed before display.
    """
    variance = triplet.science.variance
    good = np.isfinite(variance) & (variance > 0)
    if good.any():
        sigma = math.sqrt(float(np.median(variance[good])))
    else:
        values = triplet.science.image[np.isfinite(triplet.science.image)]
        sigma = float(1.4826 * np.median(np.abs(values - np.median(values)))) if values.size else 1.0
    sigma = sigma if sigma > 0 else 1.0
    out: dict[str, float] = {"sigma": sigma, "softening": 2.0 * sigma, "vmin": -3.0 * sigma}
    top = 10.0 * sigma
    # Defects (bad columns, cosmic rays, saturation) would set the scale; leave them out of it.
    defects = np.uint32(mask_value(("BAD", "SAT", "CR", "NO_DATA", "SUSPECT", "INTRP")))
    for name, cutout in triplet.panels():
        if cutout is None:
            continue
        sky = _border_sky(cutout.image)
        out[f"sky_{name}"] = sky
        clean = np.isfinite(cutout.image) & ((cutout.mask & defects) == 0)
        values = cutout.image[clean] - sky
        if values.size:
            top = max(top, float(np.percentile(values, 99.5)))
    out["vmax"] = top
    return out


def _display(image: np.ndarray, sky: float, stretch: dict[str, float]) -> np.ndarray:
    soft, vmin, vmax = stretch["softening"], stretch["vmin"], stretch["vmax"]
    value = np.clip(image - sky, vmin, vmax) - vmin
    return np.arcsinh(value / soft) / np.arcsinh((vmax - vmin) / soft)


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # an optional extra
        raise ConfigurationError(
            "plotting needs matplotlib: install the 'plot' extra (pip install diffim-dask[plot])"
        ) from exc
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure


def _row_title(info: dict[str, Any]) -> str:
    parts = []
    if "kind" in info:
        parts.append(str(info["kind"]))
    if "diaSourceId" in info:
        parts.append(f"id {int(info['diaSourceId'])}")
    if "visit" in info:
        parts.append(f"v{int(info['visit'])} d{int(info.get('detector', 0))}")
    if "snr" in info and info["snr"] is not None and np.isfinite(info["snr"]):
        parts.append(f"S/N {float(info['snr']):.1f}")
    parts.append(f"({info.get('x', float('nan')):.1f}, {info.get('y', float('nan')):.1f})")
    return "  ".join(parts)


def _reticle(ax, x: float, y: float, size: int) -> None:
    """Two ticks pointing at (x, y) from the left and from above, leaving the source itself bare."""
    gap = max(2.5, 0.12 * size)
    length = max(3.0, 0.15 * size)
    style = {"color": "tab:red", "lw": 1.2, "solid_capstyle": "butt"}
    ax.plot([x - gap - length, x - gap], [y, y], **style)
    ax.plot([x, x], [y + gap, y + gap + length], **style)


def triplet_figure(triplets: list[CutoutTriplet], *, panel_inches: float = 1.6):
    """A matplotlib Figure with one row per triplet (science, template, difference).

    Each row uses its own common stretch (:func:`triplet_stretch`); red ticks
    on every panel point at the source position without covering it.
    """
    Figure = _pyplot()
    n = max(1, len(triplets))
    fig = Figure(figsize=(3 * panel_inches, n * (panel_inches + 0.3)), dpi=90)
    axes = fig.subplots(n, 3, squeeze=False)
    for row, triplet in enumerate(triplets):
        stretch = triplet_stretch(triplet)
        for col, (name, cutout) in enumerate(triplet.panels()):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.03, 0.03, name, color="gold", fontsize=7.5, transform=ax.transAxes,
                    ha="left", va="bottom",
                    bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.0, "linewidth": 0})
            if cutout is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                continue
            shown = _display(cutout.image, stretch.get(f"sky_{name}", 0.0), stretch)
            ax.imshow(np.nan_to_num(shown, nan=0.0), origin="lower", cmap="gray", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
            _reticle(ax, cutout.x - cutout.x0, cutout.y - cutout.y0, cutout.size)
            ax.set_xlim(-0.5, cutout.size - 0.5)
            ax.set_ylim(-0.5, cutout.size - 0.5)
        axes[row, 0].text(0.0, 1.04, _row_title(triplet.info), fontsize=7.5, ha="left", va="bottom",
                          transform=axes[row, 0].transAxes)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.3 / (n * (panel_inches + 0.3)),
                        bottom=0.02, wspace=0.04, hspace=0.25)
    return fig


def figure_png(fig) -> bytes:
    """PNG bytes of a matplotlib Figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_triplet_png(triplet: CutoutTriplet | list[CutoutTriplet], path: str | Path) -> Path:
    """Write one triplet (or several, one per row) as a PNG file."""
    triplets = triplet if isinstance(triplet, list) else [triplet]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(triplet_figure(triplets)))
    return path


# ----------------------------------------------------------------------------------------------
# FITS stamps (alert style)
# ----------------------------------------------------------------------------------------------


def cutout_to_fits(cutout: Cutout, *, name: str = "", compress: bool = True) -> bytes:
    """The stamp as (gzip-compressed) FITS bytes: image + WCS, VARIANCE, MASK.

    ``LTV1 = -x0``, ``LTV2 = -y0`` give the parent-frame offset (IRAF
    convention: parent = stamp − LTV); ``XPOS``/``YPOS`` the requested centre.
    """
    from astropy.io import fits

    header = cutout.wcs.to_header(relax=True) if cutout.wcs is not None else fits.Header()
    header["LTV1"] = (-cutout.x0, "parent x = stamp x - LTV1")
    header["LTV2"] = (-cutout.y0, "parent y = stamp y - LTV2")
    header["XPOS"] = (cutout.x, "requested centre x, parent frame (0-based)")
    header["YPOS"] = (cutout.y, "requested centre y, parent frame (0-based)")
    if name:
        header["STAMP"] = (name, "which image the stamp was cut from")
    hdus = fits.HDUList([
        fits.PrimaryHDU(cutout.image.astype(np.float32), header=header),
        fits.ImageHDU(cutout.variance.astype(np.float32), name="VARIANCE"),
        fits.ImageHDU(cutout.mask.astype(np.int32), name="MASK"),
    ])
    buffer = io.BytesIO()
    hdus.writeto(buffer)
    data = buffer.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def cutout_from_fits(data: bytes) -> Cutout:
    """Inverse of :func:`cutout_to_fits` (gzip-compressed or not)."""
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    with fits.open(io.BytesIO(data)) as hdus:
        header = hdus[0].header
        image = np.array(hdus[0].data, dtype=np.float32)
        variance = np.array(hdus["VARIANCE"].data, dtype=np.float32)
        mask = np.array(hdus["MASK"].data).astype(MASK_DTYPE)
        wcs = None
        if "CTYPE1" in header:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                wcs = WCS(header, relax=True)
        return Cutout(image, variance, mask, -int(header["LTV1"]), -int(header["LTV2"]),
                      float(header["XPOS"]), float(header["YPOS"]), wcs)


def _kind(row) -> str:
    if bool(row.get("isDipole", False)):
        return "dipole"
    return "negative" if bool(row.get("isNegative", False)) else "positive"


def add_cutout_columns(catalog: pd.DataFrame, science: Exposure, template: Exposure | None,
                       difference: Exposure, *, size: int = 31, top_n: int | None = None,
                       sort_by: str = "snr") -> pd.DataFrame:
    """Copy of ``catalog`` with the three stamps of each DIA source as FITS bytes (alert style).

    Parameters
    ----------
    catalog : pandas.DataFrame
        DIA sources (``x``, ``y``; sky sources get no stamps).
    science, template, difference : Exposure
        The images of the subtraction (``template`` may be None).
    size : int
        Stamp side.
    top_n : int, optional
        Only the ``top_n`` sources with the largest ``sort_by`` get stamps.
    sort_by : str
        Column ranking the sources for ``top_n``.

    Returns
    -------
    pandas.DataFrame
        With binary columns :data:`CUTOUT_COLUMNS` (None where no stamp was
        made); it writes to Parquet as is.
    """
    out = catalog.copy()
    for column in CUTOUT_COLUMNS:
        out[column] = pd.Series([None] * len(out), index=out.index, dtype=object)
    candidates = out
    if "isSky" in out:
        candidates = out[~out["isSky"].to_numpy(bool)]
    if top_n is not None:
        candidates = candidates.reindex(
            candidates[sort_by].abs().sort_values(ascending=False).index[:top_n])
    for index, row in candidates.iterrows():
        triplet = cutout_triplet(science, template, difference, float(row["x"]), float(row["y"]), size)
        for column, (name, cutout) in zip(CUTOUT_COLUMNS, triplet.panels()):
            if cutout is not None:
                out.at[index, column] = cutout_to_fits(cutout, name=name)
    return out


def select_gallery(catalog: pd.DataFrame, n_per_kind: int = 6) -> dict[str, pd.DataFrame]:
    """The ``n_per_kind`` highest-S/N positives, negatives and dipoles of a catalog (no sky sources)."""
    real = catalog[~catalog["isSky"].to_numpy(bool)] if "isSky" in catalog else catalog
    if len(real) == 0:
        return {"positive": real, "negative": real, "dipole": real}
    kinds = real.apply(_kind, axis=1)
    order = real["snr"].abs().to_numpy() if "snr" in real else np.zeros(len(real))
    real = real.assign(kind=kinds.to_numpy(), _order=order)
    out = {}
    for kind in ("positive", "negative", "dipole"):
        chosen = real[real["kind"] == kind].sort_values("_order", ascending=False).head(n_per_kind)
        out[kind] = chosen.drop(columns="_order")
    return out


def write_cutout_pngs(catalog: pd.DataFrame, science: Exposure, template: Exposure | None,
                      difference: Exposure, out_dir: str | Path, *, top_n: int = 20,
                      size: int = 31) -> list[Path]:
    """One PNG triplet per DIA source (the ``top_n`` by S/N): ``diaSource_<id>.png``."""
    out_dir = Path(out_dir)
    real = catalog[~catalog["isSky"].to_numpy(bool)] if "isSky" in catalog else catalog
    real = real.reindex(real["snr"].abs().sort_values(ascending=False).index[:top_n])
    paths = []
    for _, row in real.iterrows():
        info = {"diaSourceId": int(row["diaSourceId"]), "snr": float(row["snr"]), "kind": _kind(row)}
        triplet = cutout_triplet(science, template, difference, float(row["x"]), float(row["y"]), size,
                                 **info)
        paths.append(write_triplet_png(triplet, out_dir / f"diaSource_{info['diaSourceId']}.png"))
    return paths
