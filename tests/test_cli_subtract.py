"""``diffim-dask subtract`` on real images (same grid) and simulated ones (template warped)."""

from __future__ import annotations

import pandas as pd
import pytest

from diffim_dask.cli import main
from diffim_dask.io import read_exposure, write_exposure_fits
from diffim_dask.simulate import Survey, SurveyConfig
from diffim_dask.template import CoaddStore
from diffim_dask.workflow.simulated_survey import simulate_survey_to_disk


@pytest.mark.realdata
def test_subtract_decam_stacks(decam_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["subtract", str(decam_dir / "Stack-DEC-OBS04.fits"),
                 str(decam_dir / "Stack-DEC-OBS18.fits"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "template same grid" in printed and "DIA sources" in printed
    difference = read_exposure(out / "difference.fits")
    assert difference.shape == (256, 256) and difference.psf is not None
    catalog = pd.read_parquet(out / "diaSources.parquet")
    near = catalog[((catalog["x"] - 129) ** 2 + (catalog["y"] - 128) ** 2) < 1.0]
    assert len(near) == 1 and near["snr"].iloc[0] >= 8


def test_subtract_warps_a_template_on_another_wcs(tmp_path, capsys):
    config = SurveyConfig(seed=8, n_visits=1, n_detectors=1, detector_shape=(384, 384))
    simulate_survey_to_disk(config, tmp_path / "survey")
    science = Survey(config).simulate_visit(0, 0).exposure
    store = CoaddStore(tmp_path / "survey" / "templates.zarr")
    band, (tract, patch) = config.band, store.patches(config.band)[0]
    template = store.open(band, tract, patch).compute()
    write_exposure_fits(science, tmp_path / "science.fits")
    write_exposure_fits(template, tmp_path / "template.fits")
    # Inputs may be fsspec URLs as well as paths.
    assert main(["subtract", f"file://{tmp_path}/science.fits", str(tmp_path / "template.fits"),
                 "--method", "alard-lupton-score", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "template warped" in printed
    assert (tmp_path / "out" / "score.fits").exists()
    assert read_exposure(tmp_path / "out" / "difference.fits").shape == (384, 384)


def test_subtract_refuses_different_grids_without_wcs(tmp_path, capsys):
    import numpy as np

    from diffim_dask import Exposure

    write_exposure_fits(Exposure.from_arrays(np.zeros((40, 50))), tmp_path / "a.fits")
    write_exposure_fits(Exposure.from_arrays(np.zeros((40, 60))), tmp_path / "b.fits")
    assert main(["subtract", str(tmp_path / "a.fits"), str(tmp_path / "b.fits"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "shapes differ" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
