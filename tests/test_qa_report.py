"""The run report on a tiny simulated run: a valid, self-contained HTML page with every section."""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
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


def test_cutout_triplets_of_any_run_sources(tiny_run):
    """The gallery's extraction, as a notebook calls it: three stamps of the same sky."""
    from diffim_dask.qa import run_cutout_triplets

    root, _ = tiny_run
    run = load_run(root / "run")
    real = run.catalog[~run.catalog["isSky"]]
    top = real.reindex(real["snr"].abs().sort_values(ascending=False).index).head(3)
    triplets, notes = run_cutout_triplets(root / "run", top, size=21)
    assert notes == [] and list(triplets) == top["diaSourceId"].tolist()
    for row in top.itertuples():
        triplet = triplets[row.diaSourceId]
        stamps = dict(triplet.panels())
        assert all(stamps[name] is not None for name in ("science", "template", "difference"))
        assert {s.image.shape for s in stamps.values()} == {(21, 21)}
        assert len({(s.x0, s.y0) for s in stamps.values()}) == 1  # one pixel grid
        assert triplet.info["kind"] in ("positive", "negative", "dipole")
        # A positive DIA source is bright at the centre of its difference stamp.
        if triplet.info["kind"] == "positive":
            core = (slice(8, 13), slice(8, 13))
            difference = stamps["difference"]
            assert difference.image[core].sum() > 5 * np.sqrt(difference.variance[core].sum())


def test_run_with_injection_is_matched_to_its_own_truth(tiny_run):
    """`run --inject N` (the pipeline's injection block): truth per unit, matched back, reported."""
    from diffim_dask.qa import injection_seed, read_injection_truth
    from diffim_dask.qa.report import evaluate_run_truth

    root, _ = tiny_run
    sim = root / "sim"
    pipeline = load_pipeline("alard-lupton")
    pipeline = pipeline.replace(
        injection=pipeline.injection.replace(n_sources=15, snr_range=(5.0, 50.0)),
        alard_lupton=pipeline.alard_lupton.replace(
            quality=pipeline.alard_lupton.quality.replace(enabled=False)))
    entries = [e for e in load_manifest(sim / "manifest.yaml") if e.visit == 0]
    result = run_survey(pipeline, entries, str(sim / "templates.zarr"), root / "injected_run",
                        manifest_path=str(sim / "manifest.yaml"))
    assert result.counts["done"] == 1
    truth, meta = read_injection_truth(root / "injected_run")
    assert len(truth) == 15 and set(truth["visit"]) == {0}
    assert meta[(0, 0)]["seed"] == injection_seed(pipeline.injection.seed, 0, 0)  # re-injectable
    run = load_run(root / "injected_run")
    summary, described = evaluate_run_truth(run, n_bootstrap=0)
    assert "15 injected point sources" in described
    m = summary.metrics
    assert m["n_injected"] == 15 and m["n_found"] >= 10  # S/N 5-50 on a clean simulated frame
    # The survey's own transients and variables are real: not false, not credited to injections.
    assert "not false" in described and m["n_known"] >= 10 and m["n_false"] <= 3
    found = summary.matched[summary.matched["found"]]
    assert (found["match_distance"] <= 3.0).all() and found["diaSourceId"].is_unique
    page = make_report(root / "injected_run", n_cutouts=2).read_text(encoding="utf-8")
    assert "15 injected point sources (RUN/injected/)" in page


def _chromium() -> str | None:
    for candidate in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


# Runs in the page after everything loaded: what a reader would see, written into the DOM.
_PROBE = """<pre id='qa-probe'></pre><script>
window.addEventListener('load', function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    var box = img.getBoundingClientRect();
    return {alt: img.alt, complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
            shown: [Math.round(box.width), Math.round(box.height)]};
  });
  var headings = Array.prototype.map.call(document.querySelectorAll('h2[id]'), function (h) {
    return [h.id, h.textContent]; });
  document.getElementById('qa-probe').textContent = JSON.stringify({
    images: images, headings: headings, errors: window.__qaErrors,
    page_width: document.documentElement.scrollWidth, view_width: window.innerWidth});
});
</script>"""
_ERRORS = ("<script>window.__qaErrors = []; window.addEventListener('error', function (e) {"
           " window.__qaErrors.push(String(e.message || (e.target && e.target.alt) || e)"
           ".slice(0, 200)); }, true);</script>")


def _run_chromium(browser, args, tmp_path):
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_in_a_headless_browser(tiny_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless chromium on PATH (Debian: apt-get install chromium); the HTML is "
                    "still validated with html.parser by the other report tests")
    _, html_path = tiny_run
    text = html_path.read_text(encoding="utf-8")
    assert "<script" not in text  # the report itself is static
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("<head>", "<head>" + _ERRORS, 1)
                      .replace("</body>", _PROBE + "</body>", 1), encoding="utf-8")
    dom = _run_chromium(browser, ["--window-size=1280,1000", "--virtual-time-budget=10000",
                                  "--dump-dom", probed.as_uri()], tmp_path)
    match = re.search(r"<pre id=\"qa-probe\">(.*?)</pre>", dom, re.S)
    assert match, "the probe did not run (no load event?)"
    state = json.loads(html.unescape(match.group(1)))
    assert state["errors"] == []
    # Every figure decoded and is laid out at a readable size.
    assert len(state["images"]) >= 5
    for image in state["images"]:
        assert image["complete"] and min(image["natural"]) > 0, image
        assert min(image["shown"]) > 100, image
    # No horizontal scrolling at a laptop's width: figures and tables fit the page.
    assert state["page_width"] <= state["view_width"], state
    shown = dict(state["headings"])
    assert {"summary", "noise", "kernel", "completeness", "gallery", "timings"} <= set(shown)
    assert shown["summary"] == "Run summary"
    # A screenshot renders (look at it when changing the report's layout).
    screenshot = tmp_path / "report.png"
    _run_chromium(browser, ["--window-size=1280,3000", f"--screenshot={screenshot}",
                            html_path.as_uri()], tmp_path)
    from matplotlib.image import imread

    pixels = imread(screenshot)
    assert pixels.shape[:2] == (3000, 1280) and float(pixels[..., :3].std()) > 0.05
