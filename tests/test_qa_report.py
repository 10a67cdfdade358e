"""The run report on a tiny simulated run: a valid, self-contained HTML page with every section."""

from __future__ import annotations

import argparse
import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

pytest.importorskip("matplotlib")
# Simulating, running and reporting a tiny survey takes ~15 s on two cores.
pytestmark = pytest.mark.slow

from diffim_dask.qa.report import (  # noqa: E402
    add_report_arguments,
    load_run,
    make_report,
    run_report_command,
)
from diffim_dask.simulate import SurveyConfig  # noqa: E402
from diffim_dask.workflow.manifest import load_manifest  # noqa: E402
from diffim_dask.workflow.pipeline import load_pipeline  # noqa: E402
from diffim_dask.workflow.run import run_survey  # noqa: E402
from diffim_dask.workflow.simulated_survey import simulate_survey_to_disk  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """2 visits x 1 detector of 256², plus a manifest entry whose science image does not exist."""
    root = tmp_path_factory.mktemp("tiny_run")
    sim = root / "sim"
    simulate_survey_to_disk(SurveyConfig(seed=2, n_visits=2, n_detectors=1, detector_shape=(256, 256)),
                            sim)
    manifest = yaml.safe_load((sim / "manifest.yaml").read_text())
    manifest["science"].append({"visit": 9, "detector": 0, "path": "science.zarr"})
    manifest_path = sim / "manifest_with_missing.yaml"
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    pipeline = load_pipeline("alard-lupton")
    # The report must show done units whatever the residual gate decides on these small images.
    pipeline = pipeline.replace(alard_lupton=pipeline.alard_lupton.replace(
        quality=pipeline.alard_lupton.quality.replace(enabled=False)))
    result = run_survey(pipeline, load_manifest(manifest_path), str(sim / "templates.zarr"),
                        root / "run", manifest_path=str(manifest_path))
    assert result.counts == {"done": 2, "skipped": 0, "failed": 1}
    html_path = make_report(root / "run")
    return root, html_path


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.ids, self.cells, self.links, self.stack = [], [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag in ("link", "script", "iframe") or (tag == "a" and attrs.get("href", "#")[:1] != "#"):
            self.links.append((tag, attrs))
        if tag == "td":
            self._cell = ""

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()
        if tag == "td":
            self.cells.append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_report_is_valid_self_contained_html(tiny_run):
    root, html_path = tiny_run
    assert html_path == root / "run" / "report.html"
    text = html_path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    page.close()
    assert page.stack == ["html"] or page.stack == []  # html.parser leaves the root open at EOF
    assert {"summary", "noise", "kernel", "completeness", "gallery", "timings"} <= set(page.ids)
    assert not page.links  # nothing external: no scripts, stylesheets or links
    # Every figure is an embedded PNG: noise, kernel sum, completeness, gallery, timings.
    assert len(page.images) >= 5
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # The summary names every unit's status and the failure's reason.
    assert page.cells.count("done") == 2 and page.cells.count("failed") == 1
    assert any("visit=9" in c and "detector=0" in c for c in page.cells)
    # Completeness against the simulated truth found through the run's manifest.
    assert "transients" in text and "snr50" in text
    assert "positives" in text and "timings" in text


def test_report_numbers_follow_the_run(tiny_run):
    root, _ = tiny_run
    run = load_run(root / "run")
    assert run.counts == {"done": 2, "skipped": 0, "failed": 1}
    from diffim_dask.qa.report import evaluate_run_truth, noise_statistics, _open_difference

    values, stats = noise_statistics(_open_difference(root / "run", 0, 0))
    assert stats["n"] > 20_000 and 0.8 < stats["robust_std"] < 1.25
    summary, described = evaluate_run_truth(run, n_bootstrap=0)
    assert "transients" in described
    assert summary.metrics["n_injected"] == 40  # 20 transients per simulated image
    assert summary.metrics["n_found"] >= 15


def test_report_command_line(tiny_run, tmp_path):
    root, _ = tiny_run
    parser = argparse.ArgumentParser()
    add_report_arguments(parser)
    out = tmp_path / "r.html"
    args = parser.parse_args([str(root / "run"), "--out", str(out), "--cutouts", "0",
                              "--truth", str(root / "sim" / "truth")])
    assert run_report_command(args) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_report_in_a_headless_browser(tiny_run, tmp_path):
    browser = next((b for b in ("/usr/bin/chromium", shutil.which("chromium") or "",
                                shutil.which("chromium-browser") or "") if b and Path(b).exists()), None)
    if browser is None:
        pytest.skip("no headless chromium installed (/usr/bin/chromium); the HTML is validated "
                    "with html.parser instead")
    _, html_path = tiny_run
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          html_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0
    assert "Run summary" in dom.stdout and "data:image/png;base64," in dom.stdout
