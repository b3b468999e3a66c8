"""Meta-evaluation metrics: hand-worked cases, scipy cross-checks, aggregation, bootstrap, plots."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from themis_ray.evaluate import metrics as M
from themis_ray.evaluate.report import format_table, write_plots

# Parsed pairs (1,1) (2,3) (4,2) (5,5); the 4th record is unparsable. |diff| = 0, 1, 2, 0.
PRED = [1, 2, 4, None, 5.0]
GOLD = [1, 3, 2, 4, 5]


# ------------------------------------------------------------------------------------ pointwise


def test_parse_rate_counts_unparsable():
    # None, NaN, inf and "x" are unparsed; 1 and the numeric string "3" parse -> 2/6
    assert M.parse_rate([1, None, float("nan"), float("inf"), "x", "3"]) == pytest.approx(2 / 6)
    assert M.parse_rate(PRED) == pytest.approx(4 / 5)
    assert math.isnan(M.parse_rate([]))


def test_mae_on_parsed_records_only():
    # (0 + 1 + 2 + 0) / 4 = 0.75; the unparsable record is not scored
    assert M.mae(PRED, GOLD) == pytest.approx(0.75)


def test_agreement_default_is_agr_2_2():
    # Agr(2,2): d=0 -> 1/1^2 = 1; d=1 -> 1/2^2 = 0.25; d=2 -> 0 (not < p); d=0 -> 1
    # (1 + 0.25 + 0 + 1) / 4 = 0.5625
    assert M.agreement(PRED, GOLD) == pytest.approx(0.5625)


def test_agreement_edge_cases():
    # |diff| exactly p gives 0, just below p does not
    assert M.agreement([3], [1], p=2, q=2) == 0.0
    assert M.agreement([2.9], [1], p=2, q=2) == pytest.approx(1 / 2.9**2)
    # q changes the weights: Agr(3,1) = (1 + 1/2 + 1/3 + 1) / 4 = 0.708333
    assert M.agreement(PRED, GOLD, p=3, q=1) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1) / 4)
    # Agr(2,0): every |diff| < 2 weighs 1 -> 3 of 4
    assert M.agreement(PRED, GOLD, p=2, q=0) == pytest.approx(0.75)
    assert math.isnan(M.agreement([None], [3]))


def test_accuracy_rounds_predictions_half_up():
    # exact: 1==1, 2!=3, 4!=2, 5==5 -> 2/4
    assert M.accuracy(PRED, GOLD) == pytest.approx(0.5)
    # 2.5 -> 3 (half up, not banker's 2), 3.49 -> 3, 1.5 -> 2, 4.6 -> 5 != 4
    assert M.accuracy([2.5, 3.49, 1.5, 4.6], [3, 3, 2, 4]) == pytest.approx(3 / 4)


def test_correlations_match_scipy_on_parsed_records():
    rng = np.random.default_rng(1)
    gold = rng.integers(1, 6, size=40).astype(float)
    pred = np.clip(gold + rng.integers(-1, 2, size=40), 1, 5).astype(object)
    pred[[3, 17]] = None
    keep = np.array([v is not None for v in pred])
    x, y = pred[keep].astype(float), gold[keep]
    assert M.pearson(pred, gold) == pytest.approx(stats.pearsonr(x, y).statistic)
    assert M.spearman(pred, gold) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert M.kendall(pred, gold) == pytest.approx(stats.kendalltau(x, y).statistic)


def test_correlations_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (M.pearson, M.spearman, M.kendall):
            assert math.isnan(fn([3, 3, 3], [1, 2, 3]))  # constant prediction
            assert math.isnan(fn([1, 2, 3], [4, 4, 4]))  # constant gold
            assert math.isnan(fn([2, None], [1, 2]))  # one parsed point
            assert math.isnan(fn([], []))
        M.pointwise_metrics([None, None], [1, 2])


def test_pointwise_metrics_dict_and_scale():
    m = M.pointwise_metrics(PRED, GOLD)
    assert m["n"] == 5 and m["n_parsed"] == 4
    assert m["parse_rate"] == pytest.approx(0.8)
    assert m["mae"] == pytest.approx(0.75)
    assert m["agreement"] == pytest.approx(0.5625)
    assert m["accuracy"] == pytest.approx(0.5)
    assert set(M.POINTWISE_METRICS) <= set(m)
    # 7 is outside 1..5: unparsed, like parse_evaluation would reject it; gold None drops the record
    m = M.pointwise_metrics([1, 7, 3, 2], [1, 2, 3, None], scale=(1, 5))
    assert (m["n"], m["n_parsed"]) == (3, 2)
    assert m["mae"] == 0.0 and m["parse_rate"] == pytest.approx(2 / 3)


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        M.mae([1, 2], [1])


# ------------------------------------------------------------------------------------- pairwise

# idx:       0    1    2    3     4     5
PW_PRED = ["A", "B", "C", "A", None, "C"]
PW_GOLD = ["A", "A", "C", "B", "B", "A"]


def test_pairwise_accuracy_with_and_without_ties():
    # with ties, parsed records 0,1,2,3,5: ok, wrong, ok, wrong, wrong -> 2/5
    assert M.pairwise_accuracy(PW_PRED, PW_GOLD) == pytest.approx(0.4)
    # without ties: drop gold tie (2) -> 0,1,3,5; predicted tie at 5 is wrong -> 1/4
    assert M.pairwise_accuracy(PW_PRED, PW_GOLD, with_ties=False) == pytest.approx(0.25)
    # "tie" is read as C, lower case accepted
    assert M.pairwise_accuracy(["c", "a"], ["tie", "A"]) == 1.0


def test_position_consistency():
    ab = ["A", "B", "C", None, "A"]
    ba_raw = ["B", "B", "C", "A", "A"]  # verdicts given with the responses swapped
    ba = M.unswap(ba_raw)  # -> A, A, C, B, B
    assert list(ba) == ["A", "A", "C", "B", "B"]
    # same: yes, no, yes, no (missing verdict), no -> 2/5
    assert M.position_consistency(ab, ba) == pytest.approx(0.4)
    assert M.position_consistency(["A"], ["A"]) == 1.0


def test_longer_wins_share():
    verdicts = ["A", "B", "C", "A", "B"]
    len_a = [10, 5, 7, 3, 4]
    len_b = [5, 10, 1, 3, 2]
    # 0: A longer, A wins (yes); 1: B longer, B wins (yes); 2: tie, skipped; 3: same length, skipped;
    # 4: A longer, B wins (no) -> 2/3
    assert M.longer_wins_share(verdicts, len_a, len_b) == pytest.approx(2 / 3)
    # texts work as well as lengths
    assert M.longer_wins_share(["A", "B"], ["long answer", "x"], ["short", "longer one"]) == 1.0
    assert math.isnan(M.longer_wins_share(["C"], [1], [2]))


def test_pairwise_metrics_dict():
    ba = ["A", "B", "C", "B", "B", "C"]  # already unswapped
    m = M.pairwise_metrics(PW_PRED, PW_GOLD, verdict_ba_unswapped=ba, len_a=[2] * 6, len_b=[1] * 6)
    assert (m["n"], m["n_parsed"]) == (6, 5)
    assert m["accuracy"] == pytest.approx(0.4)
    assert m["accuracy_without_ties"] == pytest.approx(0.25)
    assert m["tie_rate"] == pytest.approx(2 / 5)  # C at 2 and 5 among 5 parsed
    assert m["position_consistency"] == pytest.approx(4 / 6)  # same at 0,1,2,5
    # A is always longer: decisive preds A,B,A -> 2/3; decisive gold A,A,B,B,A -> 3/5
    assert m["longer_wins_share"] == pytest.approx(2 / 3)
    assert m["gold_longer_wins_share"] == pytest.approx(3 / 5)
    assert M.pairwise_metrics(PW_PRED, PW_GOLD)["position_consistency"] is None


# ---------------------------------------------------------------------------------- aggregation


def test_normalize():
    assert M.normalize(0.3, random=0.3, ideal=1.0) == 0.0
    assert M.normalize(1.0, random=0.3, ideal=1.0) == 1.0
    # MAE, lower is better: random 1.6, ideal 0 -> 0.8 is halfway
    assert M.normalize(0.8, random=1.6, ideal=0.0) == pytest.approx(0.5)
    assert M.normalize(0.0, random=1.6, ideal=0.0) == 1.0
    assert math.isnan(M.normalize(float("nan"), 0.0, 1.0))
    assert math.isnan(M.normalize(0.5, 1.0, 1.0))


def test_aggregate():
    baselines = {"mae": 1.6, "pearson": 0.0}
    ideals = {"mae": 0.0, "pearson": 1.0}
    # (0.5 + 0.5) / 2; "n" has no baseline and is ignored
    assert M.aggregate({"mae": 0.8, "pearson": 0.5, "n": 10}, baselines, ideals) == pytest.approx(0.5)
    assert M.aggregate(baselines, baselines, ideals) == 0.0
    assert M.aggregate(ideals, baselines, ideals) == 1.0
    nan_case = {"mae": 0.0, "pearson": float("nan")}
    assert math.isnan(M.aggregate(nan_case, baselines, ideals))
    assert M.aggregate(nan_case, baselines, ideals, skipna=True) == 1.0


def test_credit_unparsed_by_hand():
    # Half parsed at 0.8 of the way from random to perfect: the unparsed half earns random's 0.
    assert M.credit_unparsed(0.8, 0.5) == pytest.approx(0.4)
    # Worse than random on the parsed half: the unparsed half earns no more than that.
    assert M.credit_unparsed(-0.4, 0.5) == pytest.approx(-0.4)
    assert M.credit_unparsed(0.8, 1.0) == pytest.approx(0.8)
    assert M.credit_unparsed(float("nan"), 0.0) == 0.0  # nothing parsed: random's level
    assert M.credit_unparsed(0.8, None) == 0.8
    with pytest.raises(ValueError, match="parse_rate"):
        M.credit_unparsed(0.8, 1.5)


def test_aggregate_with_a_parse_rate_counts_unparsed_records():
    baselines = {"mae": 1.6, "pearson": 0.0, "spearman": float("nan")}
    ideals = {"mae": 0.0, "pearson": 1.0, "spearman": 1.0}
    perfect = {"mae": 0.0, "pearson": 1.0, "spearman": 1.0}
    assert M.aggregate(perfect, baselines, ideals, skipna=True) == 1.0
    assert M.aggregate(perfect, baselines, ideals, skipna=True, parse_rate=0.25) == pytest.approx(0.25)
    # A metric over every record already counts the unparsed ones: it is not scaled again.
    assert M.aggregate(perfect, baselines, ideals, skipna=True, parse_rate=0.25,
                       over_all_records=("pearson",)) == pytest.approx((0.25 + 1.0) / 2)
    # No parsed record: every metric with a baseline scores random's 0; one without a baseline stays out.
    nothing = {"mae": float("nan"), "pearson": float("nan"), "spearman": float("nan")}
    assert M.aggregate(nothing, baselines, ideals, skipna=True, parse_rate=0.0) == 0.0


def test_a_judge_that_parses_one_percent_perfectly_aggregates_low():
    from themis_ray.evaluate.results import pairwise_summary, pointwise_summary

    gold = [1, 2, 3, 4, 5] * 20
    pred = [gold[0]] + [None] * 99  # one parsed answer in 100, and it is right
    m = pointwise_summary(pred, gold)
    assert (m["n"], m["n_parsed"], m["mae"], m["accuracy"]) == (100, 1, 0.0, 1.0)
    assert m["aggregate_parsed"] == pytest.approx(1.0)  # the parsed record alone looks perfect...
    assert m["aggregate"] == pytest.approx(0.01)  # ...but 99 records went unanswered
    # The same judge answering every record perfectly is the one that scores 1.
    assert pointwise_summary(gold, gold)["aggregate"] == pytest.approx(1.0)
    # Off-scale answers are unparsed too: they cannot rescue the aggregate.
    assert pointwise_summary([gold[0]] + [9] * 99, gold)["aggregate"] == pytest.approx(0.01)
    # Its bootstrap interval is about the aggregate over every record as well.
    low, high = pointwise_summary(pred, gold, n_boot=200)["aggregate_ci"]
    assert high < 0.1

    gold_v = ["A", "B", "C", "A"] * 25
    verdicts = [gold_v[0]] + [None] * 99
    w = pairwise_summary(verdicts, gold_v, verdicts, [M.unswap([v])[0] for v in verdicts])
    assert w["accuracy"] == 1.0 and w["parse_rate"] == pytest.approx(0.01)
    assert w["aggregate_parsed"] > 0.3  # accuracies perfect; consistency counted over all records
    assert w["aggregate"] < 0.01


def test_parsing_more_never_lowers_the_aggregate_and_silence_never_beats_answering():
    from themis_ray.evaluate.results import pointwise_summary

    rng = np.random.default_rng(5)
    gold = rng.integers(1, 6, size=60).astype(float)
    good = np.clip(gold + rng.integers(-1, 2, size=60), 1, 5).astype(object)
    previous = -math.inf
    for parsed in (6, 15, 30, 45, 60):  # the same good answers, more and more of them parsed
        pred = good.copy()
        pred[parsed:] = None
        value = pointwise_summary(pred, gold)["aggregate"]
        assert value >= previous - 1e-9
        previous = value
    # A judge worse than random (always the opposite end of the scale) gains nothing by not answering.
    bad = (6 - gold).astype(object)
    full = pointwise_summary(bad, gold)["aggregate"]
    half = bad.copy()
    half[::2] = None
    assert full < 0 and pointwise_summary(half, gold)["aggregate"] <= full + 0.05


def test_random_baseline_pointwise():
    gold = [3] * 50
    # uniform over 1..5 against gold 3: E|U-3| = (2+1+0+1+2)/5 = 1.2; P(hit) = 1/5
    assert M.random_baseline(gold, (1, 5), M.mae) == pytest.approx(1.2, abs=0.03)
    assert M.random_baseline(gold, (1, 5), M.accuracy) == pytest.approx(0.2, abs=0.02)
    # Agr(2,2): (0 + 1/4 + 1 + 1/4 + 0)/5 = 0.3
    assert M.random_baseline(gold, (1, 5), M.agreement) == pytest.approx(0.3, abs=0.02)
    # seeded: same value twice
    assert M.random_baseline(gold, (1, 5), M.mae, seed=7) == M.random_baseline(gold, (1, 5), M.mae, seed=7)
    rng = np.random.default_rng(0)
    mixed = rng.integers(1, 6, size=60)
    assert M.random_baseline(mixed, (1, 5), M.pearson, n_draws=100) == pytest.approx(0.0, abs=0.05)


def test_random_baseline_pairwise_and_pointwise_baselines():
    gold = ["A", "B"] * 20
    assert M.random_baseline(gold, ("A", "B", "C"), M.pairwise_accuracy) == pytest.approx(1 / 3, abs=0.03)
    b = M.pointwise_baselines([1, 2, 3, 4, 5] * 6, n_draws=50)
    assert set(b) == set(M.POINTWISE_METRICS)
    # a random judge normalises to about 0, a perfect one to 1
    perfect = M.pointwise_metrics([1, 2, 3, 4, 5] * 6, [1, 2, 3, 4, 5] * 6)
    assert M.aggregate(perfect, b, M.POINTWISE_IDEALS) == pytest.approx(1.0)
    assert M.aggregate(b, b, M.POINTWISE_IDEALS) == pytest.approx(0.0)


# ------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(3)
    gold = rng.integers(1, 6, size=60)
    pred = np.clip(gold + rng.integers(-2, 3, size=60), 1, 5)
    point = M.mae(pred, gold)
    low, high = M.bootstrap_ci(pred, gold, M.mae, n=300, seed=0)
    assert low <= point <= high and low < high
    assert M.bootstrap_ci(pred, gold, M.mae, n=300, seed=0) == (low, high)
    assert M.bootstrap_ci(pred, gold, M.mae, n=300, seed=1) != (low, high)
    # works on verdicts too
    lo, hi = M.bootstrap_ci(PW_PRED * 5, PW_GOLD * 5, M.pairwise_accuracy, n=200)
    assert lo <= M.pairwise_accuracy(PW_PRED, PW_GOLD) <= hi


# --------------------------------------------------------------------------------------- groups


def test_per_group():
    df = pd.DataFrame(
        {
            "scenario": ["qa", "qa", "code", "code", "code"],
            "pred": [1, 2, 3, None, 5],
            "gold": [1, 3, 3, 4, 4],
        }
    )
    out = M.per_group(df, "scenario", lambda g: M.pointwise_metrics(g["pred"], g["gold"]), overall="all")
    assert list(out) == ["code", "qa", "all"]
    assert (out["code"]["n"], out["code"]["n_parsed"]) == (3, 2)
    assert out["qa"]["mae"] == pytest.approx(0.5)  # (0 + 1) / 2
    assert out["code"]["mae"] == pytest.approx(0.5)  # (0 + 1) / 2
    assert out["all"]["n"] == 5
    # list of records with a separate label sequence
    records = df.drop(columns="scenario").to_dict("records")
    out2 = M.per_group(records, df["scenario"].tolist(), lambda g: {"n": len(g)})
    assert out2 == {"code": {"n": 3}, "qa": {"n": 2}}


# ------------------------------------------------------------------------------------- reporting


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # the IHDR chunk


def test_write_plots_draws_a_confusion_matrix_and_a_histogram_sized_by_the_scale(tmp_path):
    pred, gold = [1, 2, 3.4, None, 7, 5], [1, 2, 3, 4, 5, None]
    confusion, scores = write_plots(tmp_path / "plots", pred, gold, name="org/judge")
    # One pair of files per judge, named after it with what a file name cannot hold replaced.
    assert (confusion.name, scores.name) == ("org_judge_confusion.png", "org_judge_scores.png")
    assert confusion.parent == scores.parent == tmp_path / "plots"
    five = _png_size(confusion.read_bytes()), _png_size(scores.read_bytes())
    wide_confusion, wide_scores = write_plots(tmp_path / "ten", pred, gold, scale=(1, 10), name="org/judge")
    ten = _png_size(wide_confusion.read_bytes()), _png_size(wide_scores.read_bytes())
    # A column per score (and one for unparsed answers): ten scores draw wider, taller matrices and
    # a wider histogram than five.
    assert ten[0][0] > five[0][0] and ten[0][1] > five[0][1] and ten[1][0] > five[1][0]


def test_format_table():
    rows = [
        {"judge": "trained", "mae": 0.51234, "n": 120, "pearson": None},
        {"judge": "base-model", "mae": 1.2, "n": 9, "pearson": 0.4},
    ]
    text = format_table(rows, ["judge", "mae", "n", "pearson"])
    lines = text.splitlines()
    assert lines[0].split() == ["judge", "mae", "n", "pearson"]
    assert lines[2].split() == ["trained", "0.512", "120", "-"]
    assert lines[3].split() == ["base-model", "1.200", "9", "0.400"]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned (numbers right-justified)


def test_score_spread_flags_a_judge_that_gives_one_value():
    one = M.score_spread([3, 3, 3.2, 3, None, 3])  # 3.2 rounds to 3: one value everywhere
    assert one["score_entropy"] == 0.0 and one["collapsed"] is True
    spread = M.score_spread([1, 2, 3, 4])
    assert spread["score_entropy"] == pytest.approx(2.0) and spread["collapsed"] is False
    ties = M.score_spread(["C"] * 8 + ["A", "B"])  # 80% ties: skewed, not collapsed
    assert ties["modal_share"] == pytest.approx(0.8) and ties["collapsed"] is False
    assert M.score_spread([None, "x"])["collapsed"] is None  # nothing parsed: unknown, not collapsed
