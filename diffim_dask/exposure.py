"""The Exposure model: pixels as an xarray Dataset plus WCS, PSF, calibration, metadata.

An :class:`Exposure` holds

* ``dataset`` — an :class:`xarray.Dataset` with ``image`` (float32), ``variance``
  (float32) and ``mask`` (uint32 bit planes, see :mod:`diffim_dask.masks`) over
  dims ``(y, x)``, backed by numpy or dask arrays. The ``x`` and ``y``
  coordinates are *pixel positions in the parent frame* (LSST's ``xy0``): a
  cut-out keeps the coordinates of the full detector, so WCS and PSF queries
  use the same positions before and after cutting.
* ``wcs`` — an :class:`astropy.wcs.WCS` mapping parent-frame pixels to sky.
* ``psf`` — a :class:`~diffim_dask.psf.PsfModel` (or ``None`` until estimated).
* ``photo_calib`` — :class:`PhotoCalib`, the zero point of the counts.
* ``info`` — :class:`VisitInfo`, the observation metadata.

Nothing here computes pixels: constructing, cutting, re-chunking and
converting to an xarray Dataset stay lazy for dask-backed data.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from typing import Any

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from .errors import BadInputDataError
from .masks import MASK_DTYPE, MASK_PLANES
from .psf.models import PsfModel, psf_from_dict

__all__ = ["Exposure", "PhotoCalib", "VisitInfo", "AB_NJY_ZERO_POINT", "grid_offset", "validate_pair"]

#: AB magnitude of 1 nJy: m_AB = -2.5 log10(f / nJy) + 31.4.
AB_NJY_ZERO_POINT = 31.4

IMAGE_DTYPE = np.float32


@dataclasses.dataclass(frozen=True)
class PhotoCalib:
    """Photometric calibration of an image.

    Parameters
    ----------
    zero_point : float
        AB magnitude of a source giving one count (ADU) in the whole exposure:
        ``m_AB = zero_point - 2.5 log10(counts)``.
    zero_point_err : float
        Its uncertainty in magnitudes (0 when unknown).

    Notes
    -----
    One count corresponds to ``10**(-0.4 (zero_point - 31.4))`` nJy.
    """

    zero_point: float
    zero_point_err: float = 0.0

    @property
    def njy_per_count(self) -> float:
        """Flux in nJy of one count."""
        return 10.0 ** (-0.4 * (self.zero_point - AB_NJY_ZERO_POINT))

    def counts_to_njy(self, counts):
        """Convert counts (or count errors) to nJy."""
        return counts * self.njy_per_count

    def njy_to_counts(self, flux):
        """Convert nJy to counts."""
        return flux / self.njy_per_count

    def to_dict(self) -> dict[str, float]:
        """Plain-data form."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class VisitInfo:
    """Observation metadata of one exposure (NaN / empty when unknown).

    Parameters
    ----------
    visit, detector : int
        Identifiers; together they name a processing unit.
    band : str
        Filter band (e.g. ``"i"``).
    mjd : float
        MJD (TAI) at mid-exposure.
    exposure_time : float
        Seconds.
    gain : float
        Electrons per count.
    read_noise : float
        Electrons.
    saturation : float
        Counts at which pixels saturate.
    airmass : float
        Airmass at mid-exposure.
    parallactic_angle : float
        Degrees, when known.
    instrument : str
        Instrument name.
    """

    visit: int = 0
    detector: int = 0
    band: str = ""
    mjd: float = math.nan
    exposure_time: float = math.nan
    gain: float = math.nan
    read_noise: float = math.nan
    saturation: float = math.nan
    airmass: float = math.nan
    parallactic_angle: float = math.nan
    instrument: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (NaN kept as float NaN)."""
        return dataclasses.asdict(self)

    def __eq__(self, other: object) -> bool:
        # Unknown values are NaN; two unknowns compare equal.
        if not isinstance(other, VisitInfo):
            return NotImplemented
        for field in dataclasses.fields(self):
            a, b = getattr(self, field.name), getattr(other, field.name)
            if a != b and not (isinstance(a, float) and isinstance(b, float)
                               and math.isnan(a) and math.isnan(b)):
                return False
        return True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VisitInfo":
        """Inverse of :meth:`to_dict`, ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes: Any) -> "VisitInfo":
        """Copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _wcs_to_header_string(wcs: WCS | None) -> str:
    if wcs is None:
        return ""
    return wcs.to_header(relax=True).tostring()


def _wcs_from_header_string(text: str) -> WCS | None:
    if not text:
        return None
    # Foreign headers may trigger astropy's informational FITSFixedWarning (e.g. DATE-OBS
    # without MJD-OBS); the fix-ups it reports do not change the celestial mapping.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(fits.Header.fromstring(text), relax=True)


def _as_array(data, dtype):
    """Cast numpy or dask data to ``dtype`` in native byte order, lazily for dask."""
    if hasattr(data, "dask"):
        return data.astype(np.dtype(dtype).newbyteorder("="))
    arr = np.asarray(data)
    return arr.astype(np.dtype(dtype).newbyteorder("="), copy=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Exposure:
    """One calibrated image with its variance, mask, WCS, PSF and metadata.

    Build one with :meth:`from_arrays`; the constructor does no validation of
    pixel values (that would force dask arrays to compute).
    """

    dataset: xr.Dataset
    wcs: WCS | None = None
    psf: PsfModel | None = None
    photo_calib: PhotoCalib | None = None
    info: VisitInfo = dataclasses.field(default_factory=VisitInfo)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_arrays(cls, image, variance=None, mask=None, *, wcs: WCS | None = None,
                    psf: PsfModel | None = None, photo_calib: PhotoCalib | None = None,
                    info: VisitInfo | None = None, origin: tuple[int, int] = (0, 0),
                    chunks: int | tuple[int, int] | None = None) -> "Exposure":
        """Build an exposure from 2-D arrays (numpy or dask).

        Parameters
        ----------
        image : array_like
            Pixel values in counts.
        variance : array_like, optional
            Per-pixel variance in counts²; defaults to ones (say so explicitly
            when it matters: readers build real variance planes).
        mask : array_like, optional
            uint32 bit planes; defaults to zeros.
        origin : (int, int)
            Parent-frame pixel position ``(x0, y0)`` of ``image[0, 0]``.
        chunks : int or (int, int), optional
            Convert to dask arrays with these chunks.

        Raises
        ------
        BadInputDataError
            If the planes are not 2-D or their shapes differ.
        """
        if getattr(image, "ndim", np.ndim(image)) != 2:
            raise BadInputDataError(f"image must be 2-D, got shape {np.shape(image)}")
        shape = tuple(image.shape)
        planes = {"image": image, "variance": variance, "mask": mask}
        for name in ("variance", "mask"):
            if planes[name] is not None and tuple(planes[name].shape) != shape:
                raise BadInputDataError(
                    f"{name} plane has shape {tuple(planes[name].shape)} but image has {shape}")
        if variance is None:
            variance = np.ones(shape, dtype=IMAGE_DTYPE)
        if mask is None:
            mask = np.zeros(shape, dtype=MASK_DTYPE)
        x0, y0 = int(origin[0]), int(origin[1])
        dataset = xr.Dataset(
            {
                "image": (("y", "x"), _as_array(image, IMAGE_DTYPE)),
                "variance": (("y", "x"), _as_array(variance, IMAGE_DTYPE)),
                "mask": (("y", "x"), _as_array(mask, MASK_DTYPE)),
            },
            coords={"y": np.arange(y0, y0 + shape[0]), "x": np.arange(x0, x0 + shape[1])},
        )
        if chunks is not None:
            if isinstance(chunks, int):
                chunks = (chunks, chunks)
            dataset = dataset.chunk({"y": chunks[0], "x": chunks[1]})
        return cls(dataset, wcs=wcs, psf=psf, photo_calib=photo_calib, info=info or VisitInfo())

    # -- planes and geometry -------------------------------------------------------------------

    @property
    def image(self) -> xr.DataArray:
        """Image plane (counts)."""
        return self.dataset["image"]

    @property
    def variance(self) -> xr.DataArray:
        """Variance plane (counts²)."""
        return self.dataset["variance"]

    @property
    def mask(self) -> xr.DataArray:
        """Mask plane (uint32 bits)."""
        return self.dataset["mask"]

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)``."""
        return (self.dataset.sizes["y"], self.dataset.sizes["x"])

    @property
    def origin(self) -> tuple[int, int]:
        """Parent-frame position ``(x0, y0)`` of the first pixel."""
        return int(self.dataset["x"].values[0]), int(self.dataset["y"].values[0])

    @property
    def center(self) -> tuple[float, float]:
        """Parent-frame position ``(x, y)`` of the image centre."""
        x0, y0 = self.origin
        ny, nx = self.shape
        return x0 + (nx - 1) / 2.0, y0 + (ny - 1) / 2.0

    @property
    def is_lazy(self) -> bool:
        """True when the planes are dask arrays."""
        return self.dataset["image"].chunks is not None

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image, variance, mask)`` as numpy arrays (computes dask data)."""
        ds = self.dataset.compute() if self.is_lazy else self.dataset
        return ds["image"].values, ds["variance"].values, ds["mask"].values

    # -- transformations -----------------------------------------------------------------------

    def replace(self, **changes: Any) -> "Exposure":
        """Copy with some attributes replaced (``dataset``, ``wcs``, ``psf``, ...)."""
        return dataclasses.replace(self, **changes)

    def with_planes(self, image=None, variance=None, mask=None) -> "Exposure":
        """Copy with new pixel planes (arrays of the same shape), keeping metadata."""
        ds = self.dataset.copy()
        for name, data, dtype in (("image", image, IMAGE_DTYPE), ("variance", variance, IMAGE_DTYPE),
                                  ("mask", mask, MASK_DTYPE)):
            if data is not None:
                if tuple(data.shape) != self.shape:
                    raise BadInputDataError(f"new {name} shape {tuple(data.shape)} != {self.shape}")
                ds[name] = (("y", "x"), _as_array(data, dtype))
        return self.replace(dataset=ds)

    def compute(self) -> "Exposure":
        """Load the pixels into memory (numpy-backed copy)."""
        return self.replace(dataset=self.dataset.compute()) if self.is_lazy else self

    def chunk(self, chunks: int | tuple[int, int]) -> "Exposure":
        """Dask-backed copy with the given chunks."""
        if isinstance(chunks, int):
            chunks = (chunks, chunks)
        return self.replace(dataset=self.dataset.chunk({"y": chunks[0], "x": chunks[1]}))

    def cutout(self, x_slice: slice, y_slice: slice) -> "Exposure":
        """Cut-out by *array* index slices; coordinates, WCS and PSF stay in the parent frame."""
        return self.replace(dataset=self.dataset.isel(x=x_slice, y=y_slice))

    def pixel_to_sky(self, x, y):
        """RA, Dec (degrees) of parent-frame pixel positions."""
        if self.wcs is None:
            raise BadInputDataError("exposure has no WCS")
        ra, dec = copy.deepcopy(self.wcs).all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
        return ra, dec

    def sky_to_pixel(self, ra, dec):
        """Parent-frame pixel positions of RA, Dec (degrees)."""
        if self.wcs is None:
            raise BadInputDataError("exposure has no WCS")
        x, y = copy.deepcopy(self.wcs).all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
        return x, y

    # -- xarray / NDData conversion ------------------------------------------------------------

    def to_xarray(self) -> xr.Dataset:
        """Self-describing Dataset: metadata serialised into ``attrs`` (JSON/FITS strings).

        The result can be written to Zarr or netCDF as is and read back with
        :meth:`from_xarray`.
        """
        ds = self.dataset.copy()
        ds.attrs = {
            "diffim_dask_exposure": 1,
            "wcs_header": _wcs_to_header_string(self.wcs),
            "psf": json.dumps(self.psf.to_dict()) if self.psf is not None else "",
            "photo_calib": json.dumps(self.photo_calib.to_dict()) if self.photo_calib else "",
            "visit_info": json.dumps(self.info.to_dict()),
            "mask_planes": json.dumps(MASK_PLANES),
        }
        return ds

    @classmethod
    def from_xarray(cls, ds: xr.Dataset) -> "Exposure":
        """Inverse of :meth:`to_xarray` (stays lazy for dask-backed data).

        Raises
        ------
        BadInputDataError
            If planes are missing or the stored mask-plane table differs from ours.
        """
        missing = [name for name in ("image", "variance", "mask") if name not in ds]
        if missing:
            raise BadInputDataError(f"dataset lacks plane(s) {missing}")
        attrs = ds.attrs
        stored_planes = attrs.get("mask_planes")
        if stored_planes and json.loads(stored_planes) != MASK_PLANES:
            raise BadInputDataError("stored mask-plane table differs from this version's table")
        psf = psf_from_dict(json.loads(attrs["psf"])) if attrs.get("psf") else None
        calib = PhotoCalib(**json.loads(attrs["photo_calib"])) if attrs.get("photo_calib") else None
        info = VisitInfo.from_dict(json.loads(attrs["visit_info"])) if attrs.get("visit_info") else VisitInfo()
        data = xr.Dataset({k: ds[k] for k in ("image", "variance", "mask")})
        return cls(data, wcs=_wcs_from_header_string(attrs.get("wcs_header", "")), psf=psf,
                   photo_calib=calib, info=info)

    def to_nddata(self, cls=None):
        """Convert to :class:`astropy.nddata.CCDData` (default) or another NDData class.

        Variance becomes ``VarianceUncertainty``; the boolean mask is "any plane
        set" and the full bit mask is kept in ``meta['mask_bits']``; the PSF stamp
        at the image centre goes to ``psf``.
        """
        from astropy import units as u
        from astropy.nddata import CCDData, VarianceUncertainty

        cls = CCDData if cls is None else cls
        image, variance, mask = self.arrays()
        meta = {"visit_info": self.info.to_dict(), "mask_bits": mask, "origin": self.origin}
        if self.photo_calib is not None:
            meta["photo_calib"] = self.photo_calib.to_dict()
        if self.psf is not None:
            meta["psf_model"] = self.psf.to_dict()
        kwargs = dict(uncertainty=VarianceUncertainty(variance), mask=mask != 0, wcs=self.wcs,
                      meta=meta)
        if self.psf is not None:
            kwargs["psf"] = self.psf.image(*self.center)
        if cls is CCDData:
            kwargs["unit"] = u.adu
        return cls(image, **kwargs)

    @classmethod
    def from_nddata(cls, nddata) -> "Exposure":
        """Build from an :class:`astropy.nddata.NDData` or ``CCDData``.

        Uses the uncertainty (variance, std-dev or inverse variance), the mask
        (``meta['mask_bits']`` when present, else boolean → BAD), WCS, and a PSF
        model from ``meta['psf_model']`` or the ``psf`` stamp.
        """
        from astropy.nddata import InverseVariance, StdDevUncertainty, VarianceUncertainty

        from .masks import mask_value
        from .psf.models import ImagePsf

        image = np.asarray(nddata.data)
        unc = nddata.uncertainty
        variance = None
        if isinstance(unc, VarianceUncertainty):
            variance = np.asarray(unc.array)
        elif isinstance(unc, StdDevUncertainty):
            variance = np.asarray(unc.array) ** 2
        elif isinstance(unc, InverseVariance):
            with np.errstate(divide="ignore"):
                variance = np.where(unc.array > 0, 1.0 / np.asarray(unc.array), np.inf)
        meta = dict(nddata.meta or {})
        if "mask_bits" in meta:
            mask = np.asarray(meta["mask_bits"], dtype=MASK_DTYPE)
        elif nddata.mask is not None:
            mask = np.where(np.asarray(nddata.mask), mask_value("BAD"), 0).astype(MASK_DTYPE)
        else:
            mask = None
        if "psf_model" in meta:
            psf = psf_from_dict(meta["psf_model"])
        elif getattr(nddata, "psf", None) is not None:
            psf = ImagePsf(nddata.psf)
        else:
            psf = None
        calib = PhotoCalib(**meta["photo_calib"]) if "photo_calib" in meta else None
        info = VisitInfo.from_dict(meta.get("visit_info", {}))
        wcs = nddata.wcs if isinstance(nddata.wcs, WCS) else None
        return cls.from_arrays(image, variance, mask, wcs=wcs, psf=psf, photo_calib=calib, info=info,
                               origin=tuple(meta.get("origin", (0, 0))))

    def __repr__(self) -> str:
        ny, nx = self.shape
        kind = "dask" if self.is_lazy else "numpy"
        return (f"Exposure({ny}x{nx} {kind}, visit={self.info.visit}, detector={self.info.detector}, "
                f"band={self.info.band!r}, psf={self.psf!r}, wcs={'yes' if self.wcs else 'no'})")


def grid_offset(reference: Exposure, other: Exposure) -> float:
    """Largest offset (pixels) between two exposures' WCSs over ``reference``'s grid.

    Maps the four corners and the centre of ``reference`` to the sky and back
    into ``other``'s pixel frame.
    """
    ny, nx = reference.shape
    x0, y0 = reference.origin
    xs = np.array([x0, x0 + nx - 1, x0, x0 + nx - 1, x0 + (nx - 1) / 2])
    ys = np.array([y0, y0, y0 + ny - 1, y0 + ny - 1, y0 + (ny - 1) / 2])
    ra, dec = reference.pixel_to_sky(xs, ys)
    tx, ty = other.sky_to_pixel(ra, dec)
    return float(np.max(np.hypot(tx - xs, ty - ys)))


def validate_pair(science: Exposure, template: Exposure, *, wcs_tolerance: float = 0.01) -> None:
    """Check that a science/template pair shares one pixel grid, band and WCS.

    Raises
    ------
    ConfigurationError
        If either input is not an :class:`Exposure`.
    BadInputDataError
        If shapes/origins, bands or WCSs (beyond ``wcs_tolerance`` pixels) differ.
    """
    from .errors import ConfigurationError

    for what, exposure in (("science", science), ("template", template)):
        if not isinstance(exposure, Exposure):
            raise ConfigurationError(
                f"the {what} input must be an Exposure, got {type(exposure).__name__}")
    if science.shape != template.shape or science.origin != template.origin:
        raise BadInputDataError(
            f"science (shape {science.shape}, origin {science.origin}) and template (shape "
            f"{template.shape}, origin {template.origin}) are not on the same pixel grid; warp "
            f"the template onto the science image first")
    if science.info.band and template.info.band and science.info.band != template.info.band:
        raise BadInputDataError(
            f"science band {science.info.band!r} differs from template band {template.info.band!r}")
    if science.wcs is not None and template.wcs is not None:
        offset = grid_offset(science, template)
        if not offset < wcs_tolerance:
            raise BadInputDataError(
                f"template WCS differs from the science WCS by up to {offset:.3g} px on the "
                f"science grid; both exposures must share one WCS")
