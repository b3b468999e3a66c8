"""The HTML report and its plots, from hand-built graded records (no model)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from themis_ray.evaluate import benchmarks as B
from themis_ray.evaluate import report as R
from themis_ray.evaluate import results as S

PNG = b"\x89PNG\r\n\x1a\n"


def pointwise_result():
    rng = np.random.default_rng(0)
    gold = rng.integers(1, 6, size=30).astype(float)
    scenarios = ["open_qa", "math_qa", "close_qa"] * 10
    graded = {}
    for judge, noise in (("trained", 0), ("base", 2)):
        pred = np.clip(gold + rng.integers(-noise, noise + 1, size=30), 1, 5).astype(object)
        pred[0] = None
        graded[judge] = pd.DataFrame({"id": [str(i) for i in range(30)], "scenario": scenarios, "score": gold,
                                      "predicted_score": pred,
                                      "predicted_expected": [None] * 30 if judge == "base" else
                                      np.clip(gold + rng.normal(0, 0.5, 30), 1, 5)})
    bench = B.Benchmark("validation", "pointwise", None, None, pa.schema([]), source="held-out <split> & teacher",
                        num_records=30, num_rejects=2)
    result = S.BenchmarkResult(bench, graded, judge_labels={"trained": "hf:/run/judge", "base": "hf:base"})
    result.summaries = S.summarize(bench, graded, n_boot=100)
    return result


def pairwise_result():
    df = pd.DataFrame({"id": ["1", "2", "3"], "scenario": ["open_qa"] * 3, "winner": ["A", "B", "C"],
                       "response_a": ["long answer", "x", "y"], "response_b": ["s", "longer", "z"],
                       "verdict_ab": ["A", "A", "C"], "verdict_ba": ["B", "A", None], "verdict": ["A", "C", None]})
    bench = B.Benchmark("file", "pairwise", None, None, pa.schema([]), source="pairs.jsonl", num_records=3)
    result = S.BenchmarkResult(bench, {"base": df})
    result.summaries = S.summarize(bench, result.graded, n_boot=50)
    return result


def unlabelled_result():
    df = pd.DataFrame({"id": ["1", "2", "3"], "predicted_score": [1.0, 4.0, None], "responder": ["x", "y", "y"],
                       "category": ["math", "writing", "writing"], "scenario": ["math_qa"] + ["creative_writing"] * 2})
    graded = {"trained": df, "base": df.assign(predicted_score=[2.0, 4.0, 5.0])}
    bench = B.Benchmark("mtbench", "unlabelled", None, None, pa.schema([]), source="MT-Bench", num_records=3)
    result = S.BenchmarkResult(bench, graded)
    result.summaries = S.summarize(bench, graded)
    return result


def test_report_renders_every_plot_and_table(tmp_path):
    page = R.write_report(tmp_path, [pointwise_result(), pairwise_result(), unlabelled_result()])
    assert page == tmp_path / "report.html"
    text = page.read_text()
    images = re.findall(r'<img src="([^"]+)"', text)
    expected = {
        "validation_by_scenario.png", "trained_confusion.png", "trained_scores.png", "trained_calibration.png",
        "base_confusion.png", "base_scores.png",  # no calibration for base: it has no expected score
        "file_by_scenario.png", "file_consistency.png", "mtbench_scores.png", "mtbench_agreement.png",
    }
    assert set(images) == expected
    for name in images:  # relative names of non-empty PNGs beside the page
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name
    assert "<script" not in text
    # Headline and per-scenario tables, with one row per judge, escaped text, CIs.
    assert text.count("<table>") == 2 + 2 + 4
    assert "held-out &lt;split&gt; &amp; teacher" in text
    for header in ("<th>mae</th>", "<th>agreement_ci</th>", "<th>aggregate</th>", "<th>position_consistency</th>",
                   "<th>longer_wins_share</th>", "<th>agr_vs_base</th>", "<th>responder_ranking_kendall</th>"):
        assert header in text, header
    assert "<td>trained</td>" in text and "<td>math_qa</td>" in text and "hf:/run/judge" in text
    assert "Records: 30; rejected: 2" in text  # the counts the stage took from its plans


def test_calibration_needs_an_expected_score(tmp_path):
    assert R.plot_calibration(tmp_path, [None, None], [1, 2]) is None
    path = R.plot_calibration(tmp_path, [1.2, 4.8, 3.0], [1, 5, 3], name="j")
    assert path.name == "j_calibration.png" and path.read_bytes().startswith(PNG)


def test_html_table_formats_and_escapes():
    table = R.html_table([{"judge": "<b>", "mae": 0.12345, "n": 3, "ci": None}], ["judge", "mae", "n", "ci"], "cap")
    assert "<td>&lt;b&gt;</td>" in table and '<td class="num">0.123</td>' in table
    assert '<td class="num">3</td>' in table and "<td>-</td>" in table and "<caption>cap</caption>" in table


def test_a_benchmark_with_nothing_to_judge_still_reports(tmp_path):
    empty = pd.DataFrame({"id": [], "scenario": [], "score": [], "predicted_score": [], "predicted_expected": []})
    bench = B.Benchmark("file", "pointwise", None, None, pa.schema([]), source="every row rejected",
                        num_records=0, num_rejects=4)
    result = S.BenchmarkResult(bench, {"base": empty})
    result.summaries = S.summarize(bench, result.graded, n_boot=10)
    assert result.summaries["base"]["overall"]["n"] == 0 and result.summaries["base"]["by_scenario"] == {}
    text = R.write_report(tmp_path, [result]).read_text()
    assert "every row rejected" in text and "Records: 0; rejected: 4" in text and "<img" not in text


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on this machine (setup.sh dev installs it where apt-get is available)")


def _screenshot(page, png, browser: str):
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,6000", f"--screenshot={png}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(png).convert("RGB"), dtype=float)


def _coloured_share(rgb) -> float:
    # The page's own style is greyscale, so coloured pixels can only come from the plots.
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())


def test_the_report_renders_in_a_headless_browser(tmp_path):
    browser = _chromium()
    page = R.write_report(tmp_path, [pointwise_result(), pairwise_result()])
    shot = _screenshot(page, tmp_path / "report_screenshot.png", browser)
    assert shot.shape[1] == 1280 and shot.std() > 10  # not a blank page
    with_plots = _coloured_share(shot)
    # The same page with its PNGs gone: only text, tables and broken-image placeholders remain.
    for png in tmp_path.glob("*.png"):
        if png.name != "report_screenshot.png":
            png.unlink()
    without_plots = _coloured_share(_screenshot(page, tmp_path / "broken.png", browser))
    assert with_plots > 0.01 and without_plots < with_plots / 10, (with_plots, without_plots)
