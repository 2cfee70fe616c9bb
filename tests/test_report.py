"""The comparison's statistics on hand cases, and the report written from entries."""

from __future__ import annotations

import json

import pytest

from components.report.collect import Entry, ReportError, SeedRun
from components.report.render import build_families, write_report
from components.report.stats import claim, interval, probability_of_improvement


def test_a_constant_has_a_point_interval():
    iv = interval([0.7, 0.7, 0.7])
    assert (iv.mean, iv.low, iv.high, iv.n) == (0.7, 0.7, 0.7, 3)
    one = interval([0.42])
    assert (one.low, one.high, one.n) == (0.42, 0.42, 1)


def test_interval_brackets_the_mean_within_the_data_range():
    values = [0.61, 0.65, 0.70, 0.72, 0.80]
    iv = interval(values)
    assert min(values) <= iv.low < iv.mean < iv.high <= max(values)
    assert iv.mean == pytest.approx(sum(values) / 5)
    assert iv.iqm == pytest.approx((0.65 + 0.70 + 0.72) / 3)  # scipy trims 25% at each end: 1 of 5
    assert interval([0.61, 0.65, 0.70]).iqm is None  # IQM from 4 seeds on
    assert interval(values) == iv  # a fixed resampling seed: the same report twice


def test_wider_spread_gives_a_wider_interval():
    narrow, wide = interval([0.5, 0.51, 0.49, 0.5]), interval([0.3, 0.7, 0.4, 0.6])
    assert wide.high - wide.low > 5 * (narrow.high - narrow.low)


def test_interval_refuses_no_values_and_nan():
    with pytest.raises(ValueError, match="at least one seed"):
        interval([])
    with pytest.raises(ValueError, match="finite"):
        interval([0.5, float("nan")])


def test_probability_of_improvement_is_mann_whitney_over_pairs():
    # X = [3, 4, 5] vs Y = [1, 2, 3]: of the 9 pairs, 8 wins and one tie (3 vs 3): (8 + 0.5) / 9
    assert probability_of_improvement([3, 4, 5], [1, 2, 3]) == pytest.approx(8.5 / 9)
    assert probability_of_improvement([1, 2, 3], [3, 4, 5]) == pytest.approx(0.5 / 9)
    assert probability_of_improvement([1, 1], [1, 1]) == pytest.approx(0.5)
    # lower is better (a loss): the smaller values win
    assert probability_of_improvement([1, 2, 3], [3, 4, 5], higher_is_better=False) == pytest.approx(8.5 / 9)


def test_claim_sentences():
    a, b = interval([0.90, 0.91, 0.92]), interval([0.70, 0.71, 0.72])
    assert claim("a", a, "b", b) == "a > b, intervals disjoint"
    assert claim("b", b, "a", a) == "a > b, intervals disjoint"
    assert claim("a", a, "b", b, higher_is_better=False) == "b > a, intervals disjoint"
    c = interval([0.69, 0.80, 0.95])
    assert claim("a", a, "c", c) == "no claim: a and c overlap"
    assert claim("a", interval([0.9]), "b", b) == "no claim: n = 1 (a)"


def _entry(name, values, task="classification", epochs=8, device_s=10.0, dataset="digits"):
    seeds = [
        SeedRun(
            i,
            f"{name}-{i}",
            {
                "test/top1": v,
                "test/top5": min(1.0, v + 0.1),
                "compute/device_seconds": device_s,
                "compute/parameters": 1000.0,
                "compute/train_wall_s": device_s / 2,
                "compute/eval_wall_s": 1.0,
            },
            [(0, v / 2), (1, v)],
        )
        for i, v in enumerate(values)
    ]
    return Entry(name, name, task, dataset, f"group-{name}", "arXiv:0", epochs, seeds)


def _task_info(task):
    return ("top1", True)


def test_families_rows_baseline_and_compute_flag(tmp_path):
    entries = [
        _entry("big", [0.90, 0.91, 0.92]),
        _entry("small", [0.70, 0.71, 0.72]),
        _entry("long", [0.78, 0.82, 0.86], device_s=100.0),
        _entry("random_init", [0.1, 0.12, 0.11], epochs=0, device_s=0.5),
    ]
    (fam,) = build_families(entries, _task_info)
    assert fam.primary == "test/top1" and fam.metrics == ["test/top1", "test/top5"]
    assert fam.baseline.entry.name == "random_init"
    assert fam.sentence == "test/top1: big > long, intervals disjoint"
    rows = {r.entry.name: r for r in fam.rows}
    assert rows["big"].p_vs_baseline == 1.0 and rows["random_init"].p_vs_baseline is None
    assert "device-s 10.0x" in rows["long"].flag and rows["big"].flag == "" and rows["random_init"].flag == ""
    assert fam.pairwise[("big", "small")] == 1.0 and fam.pairwise[("small", "big")] == 0.0

    summary = write_report([fam], tmp_path, {"git commit": "abc"})
    assert summary["digits-classification"]["runs"]["big"]["mean"] == pytest.approx(0.91)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    page = (tmp_path / "index.html").read_text()
    assert "data-run='big' data-metric='test/top1'" in page and "http" not in page.replace("http-equiv", "")
    md = (tmp_path / "families" / "digits-classification.md").read_text()
    assert "| big | big | 3 | 0.910 [" in md and "P(> baseline)" in md
    csv_lines = (tmp_path / "families" / "digits-classification.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 4 * 2  # header, 4 runs x 2 metrics
    assert {p.name for p in (tmp_path / "families").glob("*.png")} == {
        "digits-classification-intervals.png",
        "digits-classification-validation_curves.png",
        "digits-classification-accuracy_vs_compute.png",
    }


def test_one_seed_makes_no_claim(tmp_path):
    (fam,) = build_families([_entry("a", [0.9]), _entry("b", [0.5])], _task_info)
    assert fam.sentence == "test/top1: no claim: n = 1 (a)"


def test_a_seed_without_the_metric_is_an_error_not_a_drop():
    e = _entry("a", [0.9, 0.8])
    del e.seeds[1].metrics["test/top1"]
    with pytest.raises(ReportError, match=r"run a: seeds \[1\] have no metric 'test/top1'"):
        e.values("test/top1")
