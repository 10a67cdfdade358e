"""The command-line entry point and the simulated-survey workflow behind ``demo``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

import diffim_dask as dd
from diffim_dask.cli import main
from diffim_dask.io import ExposureStore
from diffim_dask.simulate import SurveyConfig
from diffim_dask.template import CoaddStore
from diffim_dask.workflow.manifest import load_manifest
from diffim_dask.workflow.simulated_survey import simulate_survey_to_disk


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert dd.__version__ in capsys.readouterr().out
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_console_script_installed():
    # The `diffim-dask` entry point exists in the environment running the tests.
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("diffim-dask") == "diffim_dask.cli:main"
    out = subprocess.run([sys.executable, "-m", "diffim_dask.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "simulate" in out


def test_simulated_survey_written_and_readable(tmp_path):
    config = SurveyConfig(seed=5, n_visits=2, n_detectors=2, detector_shape=(256, 256))
    summary = simulate_survey_to_disk(config, tmp_path)
    assert summary["n_science"] == 4 and summary["n_templates"] >= 1
    store = ExposureStore(tmp_path / "science.zarr")
    assert store.list() == [(0, 0), (0, 1), (1, 0), (1, 1)]
    exposure = store.open(1, 1)
    assert exposure.is_lazy and exposure.shape == (256, 256) and exposure.psf is not None
    assert exposure.info.visit == 1 and exposure.info.detector == 1
    manifest = yaml.safe_load((tmp_path / "manifest.yaml").read_text())
    assert SurveyConfig.from_dict(manifest["survey"]) == config
    assert [e.key for e in load_manifest(tmp_path / "manifest.yaml")] == store.list()
    templates = CoaddStore(tmp_path / manifest["templates"])
    keys = templates.patches(config.band)
    assert len(keys) == summary["n_templates"]
    template = templates.open(config.band, *keys[0])
    assert template.psf is not None and template.wcs is not None
    truth = pd.read_parquet(tmp_path / "truth" / "visit=1" / "detector=1.parquet")
    assert (truth["kind"] == "transient").sum() == summary["science"][3]["n_transients"]
    recorded = json.loads((tmp_path / "summary.json").read_text())
    assert recorded["n_transients"] == summary["n_transients"]
    # The same seed gives the same pixels when the survey is written again.
    with pytest.raises(dd.ConfigurationError, match="--overwrite"):
        simulate_survey_to_disk(config, tmp_path)
    first = exposure.arrays()[0]
    simulate_survey_to_disk(config, tmp_path, overwrite=True)
    np.testing.assert_array_equal(ExposureStore(tmp_path / "science.zarr").open(1, 1).arrays()[0], first)


@pytest.mark.cluster
@pytest.mark.slow
def test_demo_runs_end_to_end_on_local_cluster(tmp_path, capsys):
    from diffim_dask.workflow.catalog import read_catalog
    from diffim_dask.workflow.evaluate import evaluate_run

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "384", "--visits", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Dask dashboard" in printed and "science images : 4" in printed
    assert "4 done, 0 skipped, 0 failed" in printed and "completeness" in printed
    assert ExposureStore(out / "survey" / "science.zarr").list() == [(0, 0), (0, 1), (1, 0), (1, 1)]
    catalog = read_catalog(out / "run")
    assert len(catalog) > 0 and catalog["diaSourceId"].is_unique
    assert sorted(catalog["visit"].unique()) == [0, 1]
    # The printed evaluation is the QA matcher's, recomputed here from the demo's outputs.
    evaluation = evaluate_run(catalog, out / "survey" / "truth", [(0, 0), (0, 1), (1, 0), (1, 1)],
                              (384, 384))
    assert evaluation.format() in printed
    assert evaluation.n_transients > 0 and 0 < evaluation.n_found <= evaluation.n_transients
    # Re-running the demo in place works (it replaces its own output).
    assert main(["demo", "--out", str(out), "--size", "384", "--visits", "2"]) == 0


def _write_truth(root, visit, detector, rows):
    path = root / f"visit={visit}" / f"detector={detector}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)


def test_demo_evaluation_uses_the_optimal_one_to_one_matcher(tmp_path):
    from diffim_dask.workflow.evaluate import evaluate_run

    base = {"trail_length": 0.0, "trail_angle": 0.0, "saturated": False}
    # Two transients 2 px apart and two detections: brightest-first greedy matching gives the
    # brighter transient its nearest detection (between the two) and leaves the fainter one
    # unmatched; the optimal assignment matches both. A moving object's trail and a saturated star explain two
    # more detections; one detection is false; a variable fainter in the science image is
    # matched only by a negative detection.
    _write_truth(tmp_path, 0, 0, [
        {"kind": "transient", "x": 50.0, "y": 50.0, "delta_flux": 900.0, "snr": 30.0, **base},
        {"kind": "transient", "x": 52.0, "y": 50.0, "delta_flux": 300.0, "snr": 10.0, **base},
        {"kind": "moving", "x": 100.0, "y": 100.0, "delta_flux": 500.0, "snr": 12.0,
         **{**base, "trail_length": 20.0}},
        {"kind": "variable", "x": 150.0, "y": 20.0, "delta_flux": -400.0, "snr": -8.0, **base},
        {"kind": "star", "x": 20.0, "y": 150.0, "delta_flux": 0.0, "snr": 0.0,
         **{**base, "saturated": True}},
    ])
    catalog = pd.DataFrame({
        "x": [51.1, 48.5, 108.0, 150.5, 25.0, 200.0],
        "y": [50.0, 50.0, 100.0, 20.0, 150.0, 200.0],
        "isNegative": [False, False, False, True, False, False],
    }).assign(visit=0, detector=0, isSky=False, isDipole=False, diaSourceId=np.arange(6),
              psfFlux=100.0, psfFluxErr=10.0, snr=10.0)
    evaluation = evaluate_run(catalog, tmp_path, [(0, 0)], (256, 256))
    assert evaluation.n_transients == 2 and evaluation.n_found == 2
    assert evaluation.matched.sort_values("x")["diaSourceId"].tolist() == [1, 0]
    assert evaluation.n_false == 1 and evaluation.n_false_near_bright == 1
    matched = evaluation.summary.sources.set_index("diaSourceId")["matched"]
    assert matched.tolist() == [True, True, False, True, False, False]
    # A positive detection at the fading variable is next to it (not false) but not its match.
    positive = catalog.assign(isNegative=False)
    matched = evaluate_run(positive, tmp_path, [(0, 0)], (256, 256)).summary.sources["matched"]
    assert not matched.iloc[3]
