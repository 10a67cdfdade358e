"""Alard–Lupton subtraction: directions, flux units, masks, chunked == whole, error paths."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from astropy.wcs import WCS

from _al_fixtures import psf_flux, rendered_pair, sky_pixels
from diffim_dask import Exposure, VisitInfo
from diffim_dask.errors import (BadInputDataError, BadSubtractionError, ConfigurationError,
                                NoWorkFound)
from diffim_dask.masks import mask_value
from diffim_dask.psf import GaussianPsf
from diffim_dask.subtract import (AlardLuptonConfig, SubtractionResult, subtract_alard_lupton,
                                  subtract_alard_lupton_preconvolved)


def _normalised_sky(result, pair):
    img, var, mask = result.difference.arrays()
    sky = sky_pixels(pair, mask)
    return img[sky] / np.sqrt(var[sky])


def test_default_convolves_the_template_and_keeps_the_science_psf():
    pair = rendered_pair((256, 256), shift=(0.3, -0.2), transients=4, seed=31)
    result = subtract_alard_lupton(pair.science, pair.template)
    assert isinstance(result, SubtractionResult) and result.score is None
    meta = result.metadata
    assert meta["mode"] == "convolveTemplate" and meta["config_mode"] == "convolveTemplate"
    assert result.difference.psf is pair.science.psf
    assert result.matched_image.psf is pair.science.psf
    assert meta["n_basis"] == 27 and meta["kernel_size"] == 21
    for key in ("kernel_sum", "kernel_sum_std", "n_used", "n_rejected", "residual_std_mean",
                "condition_number", "basis_sigmas", "time_fit", "time_apply", "time_total",
                "footprint_ratio_mean", "science_variance_scale"):
        assert key in meta
    assert np.std(_normalised_sky(result, pair)) == pytest.approx(1.0, abs=0.05)
    # Transients keep their science flux in the difference.
    img, var, _ = result.difference.arrays()
    for x, y, f in zip(pair.transients["x"], pair.transients["y"], pair.transients["flux"]):
        flux, err = psf_flux(img, var, x, y, pair.science.psf)
        assert flux == pytest.approx(f, abs=4 * err)


@pytest.mark.parametrize("mode", ["convolveTemplate", "convolveScience"])
def test_difference_is_in_science_flux_units_in_both_directions(mode):
    # Template 2x brighter (another zero point); for convolveScience the template is the broader.
    fwhms = (2.5, 3.6) if mode == "convolveTemplate" else (3.8, 2.7)
    pair = rendered_pair((256, 256), template_fwhm=fwhms[0], science_fwhm=fwhms[1],
                         template_scale=2.0, transients=5, transient_flux=4000.0, seed=32)
    result = subtract_alard_lupton(pair.science, pair.template, AlardLuptonConfig(mode=mode))
    assert result.metadata["mode"] == mode
    expected_sum = 0.5 if mode == "convolveTemplate" else 2.0
    assert result.kernel.kernel_sum() == pytest.approx(expected_sum, rel=0.01)
    unconvolved = pair.science if mode == "convolveTemplate" else pair.template
    if mode == "convolveTemplate":
        assert result.difference.psf is unconvolved.psf
    else:
        # The decorrelation sharpens the template PSF when the noisy science image is convolved.
        assert result.metadata["difference_psf"] == "decorrelated"
        assert result.difference.psf.fwhm() < 0.9 * unconvolved.psf.fwhm()
    img, var, mask = result.difference.arrays()
    fluxes = []
    for x, y, f in zip(pair.transients["x"], pair.transients["y"], pair.transients["flux"]):
        flux, err = psf_flux(img, var, x, y, result.difference.psf, size=21)
        assert flux == pytest.approx(f, abs=4 * err + 0.02 * f)
        fluxes.append(flux / f)
    assert np.mean(fluxes) == pytest.approx(1.0, abs=0.03)
    assert np.std(_normalised_sky(result, pair)) == pytest.approx(1.0, abs=0.05)
    if mode == "convolveScience":
        # Matched science image = S ⊗ K / κ: its static stars match the template / κ.
        matched, _, _ = result.matched_image.arrays()
        template, _, _ = pair.template.arrays()
        star = np.argmax(pair.stars["flux"])
        ix, iy = int(round(pair.stars["x"][star])), int(round(pair.stars["y"][star]))
        box = (slice(iy - 6, iy + 7), slice(ix - 6, ix + 7))
        assert matched[box].sum() == pytest.approx(template[box].sum() / 2.0, rel=0.02)


def test_auto_mode_picks_the_direction_from_the_psf_widths():
    sharp_template = rendered_pair((192, 192), template_fwhm=2.5, science_fwhm=3.5, seed=33)
    broad_template = rendered_pair((192, 192), template_fwhm=3.8, science_fwhm=2.8, seed=33)
    auto = AlardLuptonConfig(mode="auto")
    assert subtract_alard_lupton(sharp_template.science, sharp_template.template,
                                 auto).metadata["mode"] == "convolveTemplate"
    assert subtract_alard_lupton(broad_template.science, broad_template.template,
                                 auto).metadata["mode"] == "convolveScience"
    # Wider in x only: the template is still convolved (anchor rule: both axes).
    science, template = broad_template.science, broad_template.template
    elongated = GaussianPsf(3.0, ellipticity=0.3, position_angle=0.0)
    xx, yy, _ = elongated.moments()
    sx, sy, _ = science.psf.moments()
    assert xx > sx and yy < sy
    result = subtract_alard_lupton(science, template.replace(psf=elongated), auto)
    assert result.metadata["mode"] == "convolveTemplate"


def _compare(chunked, whole, name, scale=None):
    """Agreement to 1e-5 relative: to the plane's own scale, or to ``scale`` if larger."""
    scale = max(float(np.max(np.abs(whole))), scale or 0.0) or 1.0
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("options", [
    # Default float32 FFTs: round-off scales with the brightest *input* pixels, so agreement is
    # measured against the input scale (this small image has a faint difference; on the 2k
    # simulation it is 4e-7 of max|D| itself).
    {},
    # float64 FFTs: agreement to 1e-5 of each output plane's own maximum (it is ~1e-13).
    {"fit": {"spatial_kernel_order": 2}, "decorrelation": {"grid": 2},
     "variance_propagation": "convolve", "subtract_background": True, "fft_precision": "float64"},
])
def test_chunked_equals_whole(options):
    pair = rendered_pair((300, 280), science_variation=(0.08, -0.05), shift=(0.2, 0.1),
                         transients=3, seed=34)
    image, variance, mask = pair.template.arrays()
    mask = mask.copy()
    mask[100:104, 50:60] |= mask_value("NO_DATA")
    mask[200, 150] |= mask_value("SAT")
    template = pair.template.with_planes(mask=mask)
    config = AlardLuptonConfig.from_dict(options)
    whole = subtract_alard_lupton(pair.science, template, config)
    chunked = subtract_alard_lupton(pair.science.chunk((97, 131)), template.chunk((97, 131)), config)
    assert chunked.difference.is_lazy and chunked.matched_image.is_lazy
    np.testing.assert_allclose(chunked.kernel.coefficients, whole.kernel.coefficients)
    # Both datasets in one dask.compute (no output plane depends on another output plane,
    # which would trip pydata/xarray#11329).
    computed = dict(zip(("difference", "matched_image"),
                        dask.compute(chunked.difference.dataset, chunked.matched_image.dataset)))
    input_scale = None
    if config.fft_precision == "float32":
        input_scale = float(np.abs(pair.science.arrays()[0]).max())
    for name in ("difference", "matched_image"):
        got = tuple(computed[name][plane].values for plane in ("image", "variance", "mask"))
        want = getattr(whole, name).arrays()
        _compare(got[0], want[0], f"{name} image", input_scale)
        _compare(got[1], want[1], f"{name} variance")
        np.testing.assert_array_equal(got[2], want[2], err_msg=f"{name} mask")


def test_chunked_equals_whole_for_the_score():
    pair = rendered_pair((256, 240), shift=(0.2, 0.1), transients=3, seed=35)
    # float64: the score is a ratio after strong cancellation; compare at face value.
    config = AlardLuptonConfig(fft_precision="float64")
    whole = subtract_alard_lupton_preconvolved(pair.science, pair.template, config)
    chunked = subtract_alard_lupton_preconvolved(pair.science.chunk((89, 101)),
                                                 pair.template.chunk((89, 101)), config)
    for name in ("score", "difference"):
        got = getattr(chunked, name).arrays()
        want = getattr(whole, name).arrays()
        _compare(got[0], want[0], f"{name} image")
        _compare(got[1], want[1], f"{name} variance")
        np.testing.assert_array_equal(got[2], want[2])


def test_masks_are_propagated():
    pair = rendered_pair((256, 256), seed=36)
    image, variance, mask = pair.template.arrays()
    mask = mask.copy()
    mask[120, 80] |= mask_value("NO_DATA")
    mask[60, 200] |= mask_value("SAT")
    mask[30, 30] |= mask_value("CR")  # not preserved from the template
    image = image.copy()
    image[120, 80] = 0.0
    template = pair.template.with_planes(image=image, mask=mask)
    sci_image, sci_var, sci_mask = pair.science.arrays()
    sci_image = sci_image.copy()
    sci_image[10, 200] = np.nan  # non-finite science pixel -> NO_DATA
    sci_mask = sci_mask.copy()
    sci_mask[150:160, 150:160] |= mask_value("DETECTED")  # cleared in the difference
    science = pair.science.with_planes(image=sci_image, mask=sci_mask)
    result = subtract_alard_lupton(science, template)
    half = result.kernel.half_width
    img, var, out = result.difference.arrays()
    no_data = (out & mask_value("NO_DATA")) != 0
    assert no_data[120 - half:120 + half + 1, 80 - half:80 + half + 1].all()
    assert not no_data[120, 80 + half + 1]
    assert no_data[10, 200] and img[10, 200] == 0 and var[10, 200] == 0
    assert out[60, 200] & mask_value("SAT_TEMPLATE") and not out[60, 203] & mask_value("SAT_TEMPLATE")
    assert not (out & mask_value(["CR", "DETECTED"])).any()
    edge = (out & mask_value("EDGE")) != 0
    width = half + result.metadata["decorrelation_kernel_size"] // 2
    assert edge[:, :width].all() and edge[:width].all() and not edge[width:-width, width:-width].any()
    assert np.isfinite(img).all() and np.isfinite(var).all()


def test_missing_psf_requires_an_estimator(monkeypatch):
    import diffim_dask.psf

    pair = rendered_pair((160, 160), seed=37)
    monkeypatch.delattr(diffim_dask.psf, "estimate_psf", raising=False)
    with pytest.raises(ConfigurationError, match="PSF"):
        subtract_alard_lupton(pair.science.replace(psf=None), pair.template)


def test_input_validation_errors():
    pair = rendered_pair((160, 160), seed=38)
    small = Exposure.from_arrays(np.zeros((100, 100), np.float32), psf=pair.template.psf)
    with pytest.raises(BadInputDataError, match="same pixel grid"):
        subtract_alard_lupton(pair.science, small)
    with pytest.raises(BadInputDataError, match="band"):
        subtract_alard_lupton(pair.science, pair.template.replace(info=VisitInfo(band="g")))
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [80.0, 80.0]
    wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    shifted = wcs.deepcopy()
    shifted.wcs.crpix = [81.0, 80.0]
    with pytest.raises(BadInputDataError, match="WCS"):
        subtract_alard_lupton(pair.science.replace(wcs=wcs), pair.template.replace(wcs=shifted))
    with pytest.raises(ConfigurationError):
        subtract_alard_lupton(pair.science, pair.template, config="fast")
    with pytest.raises(ConfigurationError, match="not one of"):
        AlardLuptonConfig(mode="sideways")
    with pytest.raises(ConfigurationError, match="unknown key"):
        AlardLuptonConfig.from_dict({"fit": {"spatial_order": 2}})
    with pytest.raises(ConfigurationError, match="always convolves the template"):
        subtract_alard_lupton_preconvolved(pair.science, pair.template,
                                           AlardLuptonConfig(mode="convolveScience"))


def test_low_coverage_is_no_work():
    pair = rendered_pair((160, 160), seed=39)
    image, variance, mask = pair.template.arrays()
    mask = np.full(mask.shape, mask_value("NO_DATA"), np.uint32)
    mask[:40, :40] = 0
    template = pair.template.with_planes(mask=mask)
    with pytest.raises(NoWorkFound, match="required"):
        subtract_alard_lupton(pair.science, template)


def test_quality_gate():
    pair = rendered_pair((192, 192), seed=40)
    strict = AlardLuptonConfig.from_dict({"quality": {"max_ratio_mean": 1e-4}})
    with pytest.raises(BadSubtractionError, match="footprint residual") as info:
        subtract_alard_lupton(pair.science, pair.template, strict)
    assert info.value.metadata["footprint_ratio_mean"] > 1e-4
    relaxed = strict.replace(quality=strict.quality.replace(enabled=False))
    result = subtract_alard_lupton(pair.science, pair.template, relaxed)
    assert result.metadata["quality_gate"] == "failed"
    default = subtract_alard_lupton(pair.science, pair.template)
    assert default.metadata["quality_gate"] == "passed"
    assert default.metadata["footprint_ratio_mean"] < 0.2


def test_delta_function_basis_end_to_end():
    pair = rendered_pair((224, 224), shift=(0.3, 0.0), n_stars=200, seed=41)
    config = AlardLuptonConfig.from_dict({"basis": {"basis": "delta-function", "kernel_size": 15},
                                          "fit": {"spatial_kernel_order": 1}})
    result = subtract_alard_lupton(pair.science, pair.template, config)
    assert result.metadata["n_basis"] == 225 and result.metadata["basis_mode"] == "delta-function"
    assert result.kernel.kernel_sum() == pytest.approx(1.0, abs=0.01)
    assert np.std(_normalised_sky(result, pair)) == pytest.approx(1.0, abs=0.05)
