"""Curation: the rules on hand-built blocks (exact where the rule is exact, the keep fractions where it
samples), and the stage end to end on a real local Ray, over Parquet parts of an ifd-like stage.

The rule tests run the same planner and block functions the stage runs, with the blocks' figures merged
in this process (`_local`) instead of by `executor.partials`; the stage tests run them on Ray."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from themis_ray import judging
from themis_ray.config import CurateConfig
from themis_ray.curate import keys, plan as planner, rules
from themis_ray.curate.augment import AUGMENTATION, KIND, AugmentPlan
from themis_ray.curate.stats import step_counts
from themis_ray.scenarios import get_scenario
from themis_ray.schema import REJECT
from themis_ray.store import StageResult, StageStore, merge_stats

OFF = dict(drop_ifd_above_one=False, keep_top_percent=100.0, max_ifd_zscore=None, rebalance=False)
RULE, SPLIT = rules.RULE, rules.SPLIT


def _table(rows, **columns) -> pa.Table:
    """rows: (scenario, ifd, score)."""
    return pa.table({"id": [f"r{i}" for i in range(len(rows))], "scenario": [r[0] for r in rows],
                     "ifd": pa.array([float(r[1]) for r in rows], pa.float64()),
                     "score": pa.array([None if r[2] is None else float(r[2]) for r in rows], pa.float64()),
                     **columns})


def _reduce(blocks):
    def reduce(fn, columns=None, **kwargs):
        merged = {}
        for block in blocks:
            part = block if columns is None else block.select([c for c in dict.fromkeys(columns) if c in block.column_names])
            merged = merge_stats(merged, json.loads(json.dumps(fn(part, **kwargs))))  # as partials sends them
        return merged
    return reduce


def _local(table: pa.Table, cfg: CurateConfig, blocks: int = 2):
    """The stage's planner and block map over `blocks` slices of `table`: (rows by id, plan, figures)."""
    parts = [table.take(pa.array(i, pa.int64())) for i in np.array_split(np.arange(table.num_rows), blocks)]
    plan, figures = planner.plan_rules(cfg, _reduce(parts))
    schema = planner.output_schema(table.schema)
    out = pa.concat_tables([planner.curate_block(p, plan, AugmentPlan(), schema) for p in parts])
    _check_accounting(table, out)
    return {r["id"]: r for r in out.to_pylist()}, plan, figures


def _check_accounting(table, out):
    assert sorted(out["id"].to_pylist()) == sorted(table["id"].to_pylist())  # every row once, no copies
    for r in out.to_pylist():
        assert (r[RULE] is None) == (r[REJECT] is None)
        assert (r[SPLIT] in ("train", "validation")) if r[RULE] is None else r[SPLIT] is None
        assert r[RULE] is None or r[RULE] in rules.RULE_IDS


def _rules(out):
    return {i: r[RULE] for i, r in out.items()}


def _kept(out):
    return [r for r in out.values() if r[RULE] is None]


# ------------------------------------------------------------------------------------ IFD rules


def test_ifd_above_one_is_dropped_with_its_rule_and_reason():
    out, _, _ = _local(_table([("a", 0.5, 3), ("a", 1.0, 3), ("a", 1.01, 4), ("b", 3.2, 5), ("b", 0.9, 4)]),
                       CurateConfig(**{**OFF, "drop_ifd_above_one": True}))
    assert _rules(out) == {"r0": None, "r1": None, "r2": "ifd_above_one", "r3": "ifd_above_one", "r4": None}
    assert out["r2"][REJECT] == "IFD > 1: the prompt does not make the answer easier"  # exactly 1 is kept
    off, _, _ = _local(_table([("a", 1.5, 3), ("a", 0.5, 3)]), CurateConfig(**OFF))
    assert not any(_rules(off).values())


def test_zscore_is_per_scenario_over_rows_past_ifd_one_and_needs_three():
    rows = [("a", 0.1, 3)] * 9 + [("a", 0.9, 3)]  # r9: mean 0.18, sd 0.253 -> z = 2.85
    rows += [("a", 5.0, 3)]  # r10: dropped by IFD > 1 first, so it must not count in a's statistics
    rows += [("b", 0.1, 3), ("b", 0.9, 3)]  # r11, r12: z = -/+0.71 but only two records
    rows += [("c", 0.1, 3), ("c", 0.1, 3), ("c", 0.9, 3)]  # r13..r15: z = -0.58, -0.58, 1.15
    out, plan, _ = _local(_table(rows), CurateConfig(**{**OFF, "drop_ifd_above_one": True, "max_ifd_zscore": 0.6}), 3)
    assert {i: r for i, r in _rules(out).items() if r} == {"r9": "ifd_zscore", "r10": "ifd_above_one",
                                                          "r15": "ifd_zscore"}
    assert out["r9"][REJECT] == "IFD z-score within scenario > 0.6"
    assert plan.zstats["a"] == pytest.approx((0.18, 0.25298, 10), abs=1e-5)


def test_zscore_threshold_by_hand():
    # a: nine 0.1 and one 0.9 -> the 0.9 has z = 0.72 / sqrt(0.576 / 9) = 2.846
    rows = [("a", 0.1, 3)] * 9 + [("a", 0.9, 3)]
    assert (0.9 - np.mean([r[1] for r in rows])) / np.std([r[1] for r in rows], ddof=1) == pytest.approx(2.846, abs=1e-3)
    kept_at_3, _, _ = _local(_table(rows), CurateConfig(**{**OFF, "max_ifd_zscore": 3.0}))
    assert not any(_rules(kept_at_3).values())
    out, _, _ = _local(_table(rows), CurateConfig(**{**OFF, "max_ifd_zscore": 2.8}), 4)
    assert _rules(out) == {**{f"r{i}": None for i in range(9)}, "r9": "ifd_zscore"}


def test_keep_top_percent_keeps_the_hardest():
    ifds = [0.30, 0.90, 0.10, 0.70, 0.50, 0.20, 0.80]
    out, _, figures = _local(_table([("a" if i % 2 else "b", v, 3) for i, v in enumerate(ifds)]),
                             CurateConfig(**{**OFF, "keep_top_percent": 50.0}))
    assert {r["ifd"] for r in _kept(out)} == {0.9, 0.8, 0.7, 0.5}  # ceil(7 * 0.5) = 4
    assert {r[REJECT] for r in out.values() if r[RULE]} == {"IFD below the top 50%"}
    assert figures["top_k"] == {"live": 7, "keep": 4, "cut": 0.5}


def test_keep_top_percent_counts_only_records_still_in():
    # 1.5 and 1.2 are dropped by IFD > 1 first; then 4 remain and 50% keeps the top 2 of those
    out, _, _ = _local(_table([("a", 1.5, 3), ("a", 1.2, 3), ("a", 0.9, 3), ("a", 0.8, 3), ("a", 0.4, 3), ("a", 0.3, 3)]),
                       CurateConfig(**{**OFF, "drop_ifd_above_one": True, "keep_top_percent": 50.0}))
    assert [out[f"r{i}"][RULE] for i in range(6)] == ["ifd_above_one"] * 2 + [None] * 2 + ["ifd_top_k"] * 2


def test_top_k_is_exact_with_ties_broken_by_id_across_refinement_rounds(monkeypatch):
    rng = np.random.default_rng(3)
    values = np.round(rng.uniform(0.2, 0.9, 300), 2)  # many exact ties
    values[:80] = 0.55  # a block of ties where the cut lands
    ids = [f"id{k:04d}" for k in rng.permutation(300)]
    table = pa.table({"id": ids, "scenario": ["a"] * 300, "ifd": values, "score": [3.0] * 300})
    expected = sorted(range(300), key=lambda i: (-values[i], ids[i]))
    for limit in (100_000, 3):  # collect the boundary bucket at once / refine into the ids first
        monkeypatch.setattr(planner, "TOP_COLLECT_MAX_ROWS", limit)
        for percent in (37.0, 62.5):
            out, _, figures = _local(table, CurateConfig(**{**OFF, "keep_top_percent": percent}), 3)
            keep = math.ceil(300 * percent / 100)
            assert {r["id"] for r in _kept(out)} == {ids[i] for i in expected[:keep]}, (limit, percent)
            assert figures["top_k"]["keep"] == keep
            assert (figures["passes"] > 4) == (limit == 3)


def test_top_k_edges_and_exact_counts():
    assert planner.top_count(10, 70.0) == 7  # 10 * 0.7 is 7.000000000000001 in floats
    assert planner.top_count(7, 50.0) == 4 and planner.top_count(3, 0.0) == 0
    none, _, _ = _local(_table([("a", 0.5, 3)] * 3), CurateConfig(**{**OFF, "keep_top_percent": 0.0}))
    assert set(_rules(none).values()) == {"ifd_top_k"}
    nan, _, _ = _local(_table([("a", 0.5, 3), ("a", float("nan"), 3)]), CurateConfig(**{**OFF, "keep_top_percent": 50.0}))
    assert _rules(nan) == {"r0": None, "r1": "ifd_top_k"}  # NaN ranks last


def test_keys_order_values_descending_then_ids():
    values = np.array([0.5, -1.0, 0.0, float("nan"), 2.5, 0.5, -0.0, 1e-300, float("inf")])
    ids = ["b", "a", "c", "d", "e", "a", "f", "g", "h"]
    got = sorted(range(len(values)), key=lambda i: keys.desc_keys(values, ids)[i])
    expected = sorted(range(len(values)), key=lambda i: (np.isnan(values[i]), -np.nan_to_num(values[i], nan=0), ids[i]))
    assert [ids[i] for i in got][:3] == ["h", "e", "a"] and ids[got[-1]] == "d"
    assert [values[i] for i in got if not np.isnan(values[i])] == [values[i] for i in expected if not np.isnan(values[i])]
    for key, value in zip(keys.desc_keys(values, ids), values):
        assert keys.value_of_desc_key(key) == value or (np.isnan(value) and np.isnan(keys.value_of_desc_key(key)))
    u = keys.unit([f"x{i}" for i in range(20000)], 0, "t")
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert (keys.unit(["x1"], 0, "t") == keys.unit(["x1"], 0, "t")).all()
    assert keys.unit(["x1"], 0, "t")[0] != keys.unit(["x1"], 1, "t")[0] != keys.unit(["x1"], 0, "u")[0]


def test_perplexity_measure_uses_its_own_column():
    table = _table([("a", v, 3) for v in (0.9, 0.8, 0.7, 0.6)]).append_column("ifd_ppl", pa.array([0.5, 0.6, 0.7, 0.8]))
    cfg = {**OFF, "keep_top_percent": 50.0}
    loss, _, _ = _local(table, CurateConfig(**cfg))
    ppl, _, _ = _local(table, CurateConfig(**{**cfg, "ifd_measure": "perplexity"}))
    assert [loss[f"r{i}"][RULE] is None for i in range(4)] == [True, True, False, False]
    assert [ppl[f"r{i}"][RULE] is None for i in range(4)] == [False, False, True, True]
    with pytest.raises(ValueError, match="ifd_measure"):
        _local(table, CurateConfig(**{**cfg, "ifd_measure": "bits"}))


# ---------------------------------------------------------------------------------- rebalancing


def test_caps_by_hand():
    assert rules.caps({5: 10, 4: 2, 3: 1}, {s: 1.0 for s in range(1, 6)}, 2.0) == {5: 2, 4: 2, 3: 1}
    assert rules.caps({1: 2, 5: 9}, {s: 1.0 for s in range(1, 6)}, 1.5) == {1: 2, 5: 3}  # ceil(2 x 1.5)
    # shares 1/4, 1/4, 1/2 for scores 1, 3, 5 -> the scarcest relative to its share is score 1 (4 / 0.25)
    assert rules.caps({1: 4, 3: 10, 5: 10, 4: 3}, {1: 1, 2: 0, 3: 1, 4: 0, 5: 2}, 1.0) == {1: 4, 3: 4, 5: 8, 4: 0}
    assert rules.verdict_caps({"A or B": 8, "C": 1}, True, 1.0) == {"A or B": 2, "C": 1}  # a tie counts twice
    assert rules.verdict_caps({"A": 6, "B": 2, "C": 4}, False, 1.0) == {"A": 2, "B": 2, "C": 2}


def test_rebalance_keeps_each_score_with_probability_cap_over_count():
    rows = [("x", 0.5, 5)] * 8 + [("x", 0.5, 4.6)] * 2 + [("x", 0.5, 4)] * 2 + [("x", 0.5, 3)]
    rows += [("y", 0.5, 4)] * 3 + [("y", 0.5, 2)] * 3
    out, plan, figures = _local(_table(rows), CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 2.0}))
    # x: score 5 has 10 (4.6 rounds to 5), 4 has 2, 3 has 1 -> cap = 2 x 1 = 2 for each score
    assert plan.score_keep == {"x": {5: 0.2, 4: 1.0, 3: 1.0}, "y": {4: 1.0, 2: 1.0}}
    assert figures["rebalance_caps"]["x"] == {"3": 1, "4": 2, "5": 2}
    dropped = [r for r in out.values() if r[RULE]]
    assert all(r[RULE] == "rebalance_score" and round(r["score"]) == 5 for r in dropped)
    assert {r[REJECT] for r in dropped} <= {"rebalanced: score 5 over-represented in x"}


def test_rebalance_toward_a_target_drops_weight_zero_scores_entirely():
    rows = [("x", 0.5, 1)] * 4 + [("x", 0.5, 3)] * 10 + [("x", 0.5, 5)] * 10 + [("x", 0.5, 4)] * 3
    out, plan, _ = _local(_table(rows), CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 1.0,
                                                       "rebalance_target": [1, 0, 1, 0, 2]}))
    assert plan.score_keep == {"x": {1: 1.0, 3: 0.4, 5: 0.8, 4: 0.0}}
    assert {r[REJECT] for r in out.values() if r["score"] == 4} == {"rebalanced: score 4 over-represented in x"}
    with pytest.raises(ValueError, match="rebalance_target needs 5"):
        _local(_table(rows), CurateConfig(**{**OFF, "rebalance": True, "rebalance_target": [1, 1]}))


def test_rebalance_sampling_lands_near_the_caps_at_scale():
    rng = np.random.default_rng(0)
    scores = rng.choice([1, 2, 3, 4, 5], size=4000, p=[0.05, 0.1, 0.15, 0.3, 0.4])
    out, plan, _ = _local(_table([("x", 0.5, s) for s in scores]),
                          CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 1.5}), 4)
    counts = Counter(scores.tolist())
    caps = rules.caps(counts, {s: 1.0 for s in range(1, 6)}, 1.5)
    kept = Counter(round(r["score"]) for r in _kept(out))
    for score, n in counts.items():
        p = caps[score] / n
        assert abs(kept[score] - caps[score]) <= 4 * math.sqrt(n * p * (1 - p)) + 1, (score, kept[score], caps[score])
    again, _, _ = _local(_table([("x", 0.5, s) for s in scores]),
                         CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 1.5}), 3)
    assert _rules(again) == _rules(out)  # deterministic for a seed, however the rows are cut into blocks
    other, _, _ = _local(_table([("x", 0.5, s) for s in scores]),
                         CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 1.5, "seed": 1}))
    assert _rules(other) != _rules(out)


def test_scenario_mix_weights():
    rows = [("a", 0.5, 3)] * 20 + [("b", 0.5, 3)] * 10 + [("c", 0.5, 3)] * 5 + [("d", 0.5, 3)] * 4
    out, plan, _ = _local(_table(rows), CurateConfig(**{**OFF, "scenario_weights": {"a": 2.0, "b": 1.0, "d": 0.0}}))
    # a : b : c = 2 : 1 : 1 (c unlisted weighs 1), limited by c's 5 records; d weighs 0
    assert plan.mix_keep == {"a": 0.5, "b": 0.5, "c": 1.0, "d": 0.0}
    assert all(out[f"r{i}"][RULE] is None for i in range(30, 35))
    assert [out[f"r{i}"][RULE] for i in range(35, 39)] == ["scenario_mix"] * 4
    assert {r[REJECT] for r in out.values() if r[RULE]} <= {"scenario mix: a above its weight",
                                                           "scenario mix: b above its weight",
                                                           "scenario mix: d above its weight"}


# ------------------------------------------------------------------------------------------- split


def test_split_is_exact_per_small_scenario():
    out, plan, figures = _local(_table([("a", 0.5, 3)] * 8 + [("b", 0.5, 3)] * 4 + [("c", 0.5, 3)] * 12),
                                CurateConfig(**{**OFF, "validation_fraction": 0.25}), 3)
    counts = Counter((r["scenario"], r[SPLIT]) for r in out.values())
    assert counts == {("a", "train"): 6, ("a", "validation"): 2, ("b", "train"): 3, ("b", "validation"): 1,
                      ("c", "train"): 9, ("c", "validation"): 3}
    assert figures["split"] == {"exact": ["a", "b", "c"], "drawn": []}


def test_split_is_seeded():
    table = _table([("a", 0.5, 3)] * 40)
    a = {i: r[SPLIT] for i, r in _local(table, CurateConfig(**{**OFF, "seed": 1}))[0].items()}
    b = {i: r[SPLIT] for i, r in _local(table, CurateConfig(**{**OFF, "seed": 1}), 5)[0].items()}
    c = {i: r[SPLIT] for i, r in _local(table, CurateConfig(**{**OFF, "seed": 2}))[0].items()}
    assert a == b and a != c and Counter(a.values()) == Counter(c.values()) == {"train": 30, "validation": 10}


@pytest.mark.parametrize("rows,fraction,expected", [
    ([("a", 0.5, 3)] * 2, 0.25, {"train": 1, "validation": 1}),
    ([("a", 0.5, 3), ("b", 0.5, 3)], 0.25, {"train": 1, "validation": 1}),
    ([("a", 0.5, 3)] * 3, 0.9, {"validation": 2, "train": 1}),
    ([("a", 0.5, 3)], 0.25, {"train": 1}),
])
def test_tiny_sets_get_both_splits(rows, fraction, expected):
    out, _, _ = _local(_table(rows), CurateConfig(**{**OFF, "validation_fraction": fraction}), 1)
    assert Counter(r[SPLIT] for r in out.values()) == expected


def test_large_scenarios_draw_their_split(monkeypatch):
    monkeypatch.setattr(planner, "EXACT_SPLIT_MAX_ROWS", 100)
    out, plan, figures = _local(_table([("big", 0.5, 3)] * 3000 + [("small", 0.5, 3)] * 50),
                                CurateConfig(**{**OFF, "validation_fraction": 0.2}), 3)
    assert figures["split"] == {"exact": ["small"], "drawn": ["big"]} and list(plan.exact_split) == ["small"]
    counts = Counter((r["scenario"], r[SPLIT]) for r in out.values())
    assert counts["small", "validation"] == 10
    assert abs(counts["big", "validation"] - 600) <= 4 * math.sqrt(3000 * 0.2 * 0.8)


def _grouped(docs: int, instructions: int, responses: int, scenario: str = "a", start: int = 0, doc=True):
    """Rows as the pipeline makes them: docs x instructions per doc x responses per instruction."""
    rows = [(d, q, r) for d in range(docs) for q in range(instructions) for r in range(responses)]
    return _table([(scenario, 0.5, 3)] * len(rows),
                  doc_id=pa.array([f"{scenario}-d{d}" if doc else None for d, _, _ in rows], pa.string()),
                  instruction_id=[f"{scenario}-d{d}-q{q}" for d, q, _ in rows]).set_column(
        0, "id", pa.array([f"{scenario}{start + i}" for i in range(len(rows))]))


def _shared(out, column) -> set:
    """Values of `column` found in both splits."""
    by_split = {"train": set(), "validation": set()}
    for r in out.values():
        by_split[r[SPLIT]].add(r[column])
    return by_split["train"] & by_split["validation"]


def test_split_keeps_each_source_document_on_one_side():
    # 10 documents x 2 instructions x 2 responses: validation takes whole documents, about 25%.
    out, _, _ = _local(_grouped(10, 2, 2), CurateConfig(**{**OFF, "validation_fraction": 0.25}), 3)
    validation = [r for r in out.values() if r[SPLIT] == "validation"]
    assert len(validation) == 8  # round(40 x 0.25) = 10, moved to the nearest document boundary
    assert not _shared(out, "doc_id") and not _shared(out, "instruction_id")


def test_split_falls_back_to_instructions_when_documents_are_too_few():
    # One document of 8 instructions x 3 responses: it cannot stay whole, its instructions do.
    out, _, _ = _local(_grouped(1, 8, 3), CurateConfig(**{**OFF, "validation_fraction": 0.25}), 2)
    assert Counter(r[SPLIT] for r in out.values()) == {"train": 18, "validation": 6}
    assert not _shared(out, "instruction_id") and _shared(out, "doc_id") == {"a-d0"}
    # One instruction only: exact per record, both splits still present.
    alone, _, _ = _local(_grouped(1, 1, 4), CurateConfig(**{**OFF, "validation_fraction": 0.25}), 2)
    assert Counter(r[SPLIT] for r in alone.values()) == {"train": 3, "validation": 1}


def test_split_groups_rows_without_a_document_by_instruction_and_pairs_with_their_document():
    def with_mode(t, mode, verdict):
        return t.append_column("mode", pa.array([mode] * t.num_rows, pa.string())).append_column(
            "verdict", pa.array([verdict] * t.num_rows, pa.string()))

    # Quizzing rows (no document), pointwise rows, and pairs of the same instructions as the latter.
    table = pa.concat_tables([with_mode(_grouped(4, 3, 2, scenario="q", doc=False), None, None),
                              with_mode(_grouped(4, 3, 2, start=100), None, None),
                              with_mode(_grouped(4, 3, 1, start=200), "pairwise", "A")])
    out, _, _ = _local(table, CurateConfig(**{**OFF, "validation_fraction": 0.3, "swap_pairwise": False}), 3)
    assert not _shared(out, "instruction_id")
    assert not _shared({i: r for i, r in out.items() if r["doc_id"] is not None}, "doc_id")


def test_large_scenarios_draw_their_split_per_document(monkeypatch):
    monkeypatch.setattr(planner, "EXACT_SPLIT_MAX_ROWS", 100)
    out, _, figures = _local(_grouped(300, 2, 3, scenario="big"),
                             CurateConfig(**{**OFF, "validation_fraction": 0.2}), 3)
    assert figures["split"] == {"exact": [], "drawn": ["big"]}
    assert not _shared(out, "doc_id")
    docs = Counter(r["doc_id"] for r in out.values() if r[SPLIT] == "validation")
    assert set(docs.values()) == {6} and abs(len(docs) - 60) <= 4 * math.sqrt(300 * 0.2 * 0.8)


def test_empty_input():
    out, _, figures = _local(_table([]), CurateConfig(), 1)
    assert out == {} and figures["split"] == {"exact": [], "drawn": []}


# ------------------------------------------------------------------------------------ pairwise


def _pairs(verdicts, scenario="p", start=0):
    n = len(verdicts)
    return pa.table({"id": [f"p{start + i}" for i in range(n)], "scenario": [scenario] * n, "mode": ["pairwise"] * n,
                     "ifd": [0.5] * n, "score": pa.nulls(n, pa.float64()), "verdict": list(verdicts)})


def test_pairwise_balance_counts_ties_twice_when_pairs_are_swapped():
    out, plan, _ = _local(_pairs("AAAAAABBC"), CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 1.0}))
    assert plan.verdict_keep == {"p": {"A or B": 0.25, "C": 1.0}}  # AB 8 -> 2, C 1 (x2 once swapped)
    assert out["p8"][RULE] is None
    assert {r[REJECT] for r in out.values() if r[RULE]} <= {"pairwise balance: verdict A or B over-represented in p"}
    _, plan, _ = _local(_pairs("AAAAAABBCCCC"), CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 1.0,
                                                                "swap_pairwise": False}))
    assert plan.verdict_keep == {"p": {"A": 1 / 3, "B": 1.0, "C": 0.5}}
    with pytest.raises(ValueError, match="verdict of A, B or C"):
        _local(_pairs("AX"), CurateConfig(**{**OFF, "rebalance": True}))


def test_pairwise_rows_skip_score_rebalancing():
    pointwise = _table([("x", 0.5, 5)] * 4 + [("x", 0.5, 1)], mode=["single"] * 5, verdict=pa.nulls(5, pa.string()))
    table = pa.concat_tables([pointwise, _pairs("AB", scenario="x").select(pointwise.column_names)])
    out, plan, _ = _local(table, CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 1.0}))
    assert plan.score_keep == {"x": {5: 0.25, 1: 1.0}} and plan.verdict_keep == {"x": {"A or B": 1.0}}
    assert out["p0"][RULE] is None and out["p1"][RULE] is None


def test_step_counts_follow_the_rules_in_order():
    kept = {"a": 3, "b": 3}
    rejected = {"ifd_above_one": {"a": 1}, "rebalance_score": {"a": 4}}
    steps = {s["step"]: s for s in step_counts(kept, rejected)}
    assert steps["labelled"]["remaining"] == 11 and steps["labelled"]["by_scenario"] == {"a": 8, "b": 3}
    assert steps["Cherry: IFD > 1"]["dropped"] == 1 and steps["Cherry: IFD > 1"]["by_scenario"] == {"a": 7, "b": 3}
    assert steps["score rebalancing"]["dropped"] == 4 and steps["score rebalancing"]["rule"] == "rebalance_score"
    assert steps["scenario mix"]["remaining"] == 6
    assert [s["step"] for s in step_counts(kept, rejected)] == ["labelled"] + [r.step for r in rules.RULES]


# ------------------------------------------------------------------------------ the stage, on Ray


@pytest.fixture(scope="module")
def ray_module():
    """One local two-CPU Ray for this module's stage tests (each stage runs several Ray Data plans)."""
    import os

    import ray

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local test cluster needs no auth token
    ray.init(num_cpus=2)
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)


def _ifd_stage(run_dir, table: pa.Table, parts: int) -> StageStore:
    """A finished ifd-like stage: `table` in `parts` Parquet files and a manifest that lists them."""
    store = StageStore(run_dir, "ifd")
    store.begin({"test": "ifd"})
    for k, index in enumerate(np.array_split(np.arange(table.num_rows), parts)):
        pq.write_table(table.take(pa.array(index, pa.int64())), store.file(f"part-{k:05d}.parquet"))
    store.commit(StageResult(rows_in=table.num_rows), {"test": "ifd"}, 0.0)
    return store


def _config(run_dir, **curate):
    from omegaconf import OmegaConf

    from themis_ray.config import PipelineConfig

    cfg = OmegaConf.structured(PipelineConfig)
    cfg.run_dir = str(run_dir)
    for key, value in curate.items():
        OmegaConf.update(cfg, f"curate.{key}", value, merge=False)
    return cfg


def _labelled_rows(n_per_scenario: int = 12, pairs: str = "AAAABBCC") -> pa.Table:
    rng = np.random.default_rng(0)
    rows = []
    for scenario in ("close_qa", "open_qa"):
        criteria = get_scenario(scenario).criteria
        for i in range(n_per_scenario):
            request = judging.JudgeRequest(instruction=f"{scenario} question {i}?", response=f"answer {i}",
                                           scenario=scenario)
            scores = rng.integers(1, 6, size=len(criteria)).tolist()
            overall = int(np.clip(round(np.mean(scores)), 1, 5))
            evaluation = "\n".join([f"[[{overall}]] overall"] + [f"{c.name}: [[{s}]]" for c, s in zip(criteria, scores)])
            rows.append({"id": f"{scenario}-{i}", "scenario": scenario, "mode": "single",
                         "instruction": request.instruction, "response": request.response, "reference": None,
                         "response_a": None, "response_b": None, "verdict": None,
                         "prompt": judging.render_prompt(request), "evaluation": evaluation,
                         "score": float(overall), "criterion_scores": [float(s) for s in scores],
                         "score_distribution": [0.2] * 5, "expected_score": 3.0,
                         "ifd": float(rng.uniform(0.3, 1.2)), "ifd_ppl": float(rng.uniform(0.3, 1.2))})
    for i, verdict in enumerate(pairs):
        request = judging.JudgeRequest(instruction=f"Which is better {i}?", response_a=f"first {i}",
                                       response_b=f"second {i}", scenario="open_qa", mode="pairwise")
        rows.append({"id": f"pair-{i}", "scenario": "open_qa", "mode": "pairwise", "instruction": request.instruction,
                     "response": None, "reference": None, "response_a": request.response_a,
                     "response_b": request.response_b, "verdict": verdict, "prompt": judging.render_prompt(request),
                     "evaluation": f"[[{verdict}]] Response A is longer than Response B.", "score": None,
                     "criterion_scores": None, "score_distribution": None, "expected_score": None,
                     "ifd": float(rng.uniform(0.3, 0.9)), "ifd_ppl": 0.5})
    rows.append({**rows[0], "id": "outlier", "ifd": 0.999})
    return pa.Table.from_pylist(rows)


@pytest.mark.integration  # runs the stage on a local Ray
def test_curate_stage_commits_counts_report_and_copies(ray_module, tmp_path):
    import sys
    from pathlib import Path

    from themis_ray import fs
    from themis_ray.pipeline import run_stage

    sys.path.insert(0, str(Path(__file__).parent))
    from openai_server import OpenAIServer

    def answer(messages):
        criterion = messages[-1]["content"].split("Criterion: ")[1]
        return "" if "contradicts" in criterion else f"Said otherwise: {criterion.lower()}"

    source = _labelled_rows()
    _ifd_stage(tmp_path, source, parts=3)
    with OpenAIServer(answer=answer) as server:
        cfg = _config(tmp_path, **{"augment.paraphrase_fraction": 0.5, "augment.drop_criteria_fraction": 0.5,
                                   "augment.rescale_fraction": 0.5, "augment.min_regression_records": 3,
                                   "augment.engine.kind": "openai", "augment.engine.base_url": server.base_url,
                                   "augment.engine.model": "paraphraser", "augment.pool.num_cpus": 0.25,
                                   "rebalance_max_ratio": 3.0})
        manifest = run_stage(cfg, "curate")
    store = StageStore(tmp_path, "curate")
    kept = store.read().to_pylist()
    originals = [r for r in kept if r[KIND] is None]
    copies = [r for r in kept if r[KIND] is not None]
    rejects = store.read_rejects().to_pylist()
    assert len(originals) + len(rejects) == source.num_rows == manifest["rows_in"]
    assert manifest["units_ok"] == len(originals) and manifest["rows_out"] == len(kept)
    assert manifest["augmented"] == dict(Counter(r[KIND] for r in copies))
    assert {k.split(":")[0] for k in manifest["augmented"]} == {"paraphrase", "drop_criteria", "rescale", "swap"}
    assert all(r[SPLIT] == "train" and r[AUGMENTATION] for r in copies)  # validation is never augmented
    train_ids = {r["id"] for r in originals if r[SPLIT] == "train"}
    assert {r["id"] for r in originals if r[SPLIT] == "validation"} and train_ids
    swapped = [r for r in copies if r[KIND] == "swap"]
    assert len(swapped) == sum(r["mode"] == "pairwise" and r[SPLIT] == "train" for r in originals)
    assert {r["id"] for r in originals} <= set(source["id"].to_pylist())
    assert len({r["id"] for r in kept}) == len(kept)
    assert all(r[REJECT] and r[RULE] in rules.RULE_IDS for r in rejects)
    assert all(r[RULE] is None for r in kept)
    assert manifest["rejected_by_rule"] == dict(Counter(r[RULE] for r in rejects))
    steps = manifest["steps"]
    assert steps[0] == {"step": "labelled", "rule": None, "dropped": 0, "remaining": source.num_rows}
    assert steps[-1]["remaining"] == len(originals)
    assert sum(s["dropped"] for s in steps) == len(rejects)
    assert manifest["splits"] == dict(Counter(r[SPLIT] for r in kept))
    assert manifest["score_histogram"] == {str(k): v for k, v in sorted(Counter(
        round(r["score"]) for r in originals if r["score"] is not None).items())}
    assert manifest["criteria_regression"]["regressions"] >= 1
    assert manifest["criteria_regression"]["validation_predictions"] > 0
    assert manifest["paraphrases"] == {"asked": 26, "usable": 24, "unusable": {"empty": 2}}  # (6 + 7) x 2
    assert manifest["statistics_passes"] == 3  # z moments, score counts, counts after rebalancing + split keys
    for name in ("report.md", "distributions.png", "ifd_by_scenario.png", "scores_by_scenario.png"):
        assert fs.exists(store.file(name)), name
    report = fs.read_text(store.file("report.md"))
    assert f"| labelled |  | 0 | {source.num_rows} |" in report and "![IFD per scenario](ifd_by_scenario.png)" in report
    assert "drop_criteria" in report and "validation MAE" in report

    # Run again (forced): the paraphrases come back from the run's request cache; the endpoint is asked nothing.
    with OpenAIServer(answer=answer) as again:
        cfg.curate.augment.engine.base_url = again.base_url
        rerun = run_stage(cfg, "curate", force=True)
    assert again.total_requests == 0 and server.total_requests == 26
    assert rerun["paraphrases"] == manifest["paraphrases"] and rerun["augmented"] == manifest["augmented"]


def _synthetic(n_close=1400, n_open=900, n_pairs=200, n_math=300, seed=7) -> pa.Table:
    """A few thousand ifd-like rows: three scenarios, skewed scores, pairwise verdicts, IFD around 1."""
    rng = np.random.default_rng(seed)
    scenario = ["close_qa"] * n_close + ["open_qa"] * (n_open + n_pairs) + ["math_qa"] * n_math
    n = len(scenario)
    mode = ["single"] * (n_close + n_open) + ["pairwise"] * n_pairs + ["single"] * n_math
    score = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], size=n, p=[0.05, 0.1, 0.15, 0.3, 0.4])
    verdict = [None] * n
    for i in range(n_close + n_open, n_close + n_open + n_pairs):
        verdict[i] = str(rng.choice(["A", "B", "C"], p=[0.55, 0.25, 0.2]))
    order = rng.permutation(n)
    return pa.table({
        "id": [f"row-{k:05d}" for k in rng.permutation(n)],
        "scenario": [scenario[i] for i in order], "mode": [mode[i] for i in order],
        "instruction": [f"Question {i}?" for i in order],
        "response": [None if mode[i] == "pairwise" else f"Answer {i}." for i in order],
        "response_a": [f"First {i}." if mode[i] == "pairwise" else None for i in order],
        "response_b": [f"Second {i}." if mode[i] == "pairwise" else None for i in order],
        "reference": pa.nulls(n, pa.string()),
        "verdict": [verdict[i] for i in order],
        "evaluation": [f"[[{verdict[i]}]] Response A is better." if mode[i] == "pairwise" else f"[[{int(score[i])}]] ok"
                       for i in order],
        "score": pa.array([None if mode[i] == "pairwise" else score[i] for i in order], pa.float64()),
        "ifd": np.round(rng.uniform(0.2, 1.3, n), 4)[order],
    })


def _within(observed: int, cap: int, n: int) -> bool:
    """A Bernoulli(cap / n) sample of n rows lands within 4 sd (+1) of its cap."""
    p = min(1.0, cap / n) if n else 0.0
    return abs(observed - cap) <= 4 * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.integration  # runs the stage on a local Ray
def test_curate_stage_at_scale_is_exact_where_exact_near_the_caps_where_sampled_and_resumes(
        ray_module, tmp_path, monkeypatch):
    from themis_ray import fs
    from themis_ray.pipeline import run_stage
    from themis_ray.store import ATTEMPT, MANIFEST

    monkeypatch.setattr(planner, "EXACT_SPLIT_MAX_ROWS", 400)  # math_qa (300) split exactly, the others drawn
    source = _synthetic()
    _ifd_stage(tmp_path, source, parts=4)
    cfg = _config(tmp_path, max_ifd_zscore=1.5, keep_top_percent=70.0, rebalance_max_ratio=1.5,
                  scenario_weights={"open_qa": 0.5}, validation_fraction=0.2)
    manifest = run_stage(cfg, "curate")
    store = StageStore(tmp_path, "curate")
    kept, rejects = store.read().to_pylist(), store.read_rejects().to_pylist()
    originals = [r for r in kept if r[KIND] is None]
    assert len(originals) + len(rejects) == source.num_rows == manifest["units_ok"] + manifest["rows_rejected"]
    assert manifest["statistics_passes"] == 5  # z moments, top-k histogram + boundary, score counts, mix + split
    rule = {r["id"]: r[RULE] for r in rejects} | {r["id"]: None for r in originals}
    rows = source.to_pylist()

    # IFD > 1 and the z-score: exact
    assert {r["id"] for r in rows if r["ifd"] > 1} == {i for i, x in rule.items() if x == "ifd_above_one"}
    past = [r for r in rows if r["ifd"] <= 1]
    expected_z = set()
    for s in ("close_qa", "open_qa", "math_qa"):
        values = np.array([r["ifd"] for r in past if r["scenario"] == s])
        mean, sd = values.mean(), values.std(ddof=1)
        expected_z |= {r["id"] for r in past if r["scenario"] == s and abs(r["ifd"] - mean) / sd > 1.5}
    assert expected_z == {i for i, x in rule.items() if x == "ifd_zscore"} and expected_z
    # top 70%: exactly ceil(70% of the rows still in), the highest IFD, ties by id
    still = sorted((r for r in past if r["id"] not in expected_z), key=lambda r: (-r["ifd"], r["id"]))
    keep = math.ceil(len(still) * 0.7)
    assert {r["id"] for r in still[keep:]} == {i for i, x in rule.items() if x == "ifd_top_k"}
    assert manifest["ifd_cuts"]["top_k"] == {"live": len(still), "keep": keep, "cut": still[keep - 1]["ifd"]}
    # rebalancing: each (scenario, score) near its cap; pairwise classes near theirs
    still = still[:keep]
    pointwise = Counter((r["scenario"], round(r["score"])) for r in still if r["mode"] != "pairwise")
    left = Counter((r["scenario"], round(r["score"])) for r in still if r["mode"] != "pairwise"
                   and rule[r["id"]] != "rebalance_score")
    for s in ("close_qa", "open_qa", "math_qa"):
        counts = {score: n for (t, score), n in pointwise.items() if t == s}
        for score, cap in rules.caps(counts, {k: 1.0 for k in range(1, 6)}, 1.5).items():
            assert _within(left[s, score], cap, counts[score]), (s, score, left[s, score], cap)
    assert all(round(r["score"]) != 1 for r in rejects if r[RULE] == "rebalance_score")  # the scarcest stays
    pairs = Counter(rules.verdict_class(r["verdict"], True) for r in still if r["mode"] == "pairwise")
    pairs_left = Counter(rules.verdict_class(r["verdict"], True) for r in still if r["mode"] == "pairwise"
                         and rule[r["id"]] != "rebalance_verdict")
    for klass, cap in rules.verdict_caps(dict(pairs), True, 1.5).items():
        assert _within(pairs_left[klass], cap, pairs[klass]), (klass, pairs_left[klass], cap)
    # scenario mix: open_qa toward half the others' share
    balanced = Counter(r["scenario"] for r in still if rule[r["id"]] not in ("rebalance_score", "rebalance_verdict"))
    mixed = Counter(r["scenario"] for r in originals)
    for s, cap in rules.caps(dict(balanced), {"close_qa": 1.0, "open_qa": 0.5, "math_qa": 1.0}, 1.0).items():
        assert _within(mixed[s], cap, balanced[s]), (s, mixed[s], cap)
    # split: exact for math_qa, drawn near 20% for the others; validation never augmented
    split = Counter((r["scenario"], r[SPLIT]) for r in originals)
    assert split["math_qa", "validation"] == round(mixed["math_qa"] * 0.2)
    for s in ("close_qa", "open_qa"):
        assert _within(split[s, "validation"], round(mixed[s] * 0.2), mixed[s])
    copies = [r for r in kept if r[KIND] is not None]
    assert {r[KIND] for r in copies} == {"swap"} and all(r[SPLIT] == "train" for r in copies)
    assert len(copies) == sum(r["mode"] == "pairwise" and r[SPLIT] == "train" for r in originals)
    assert manifest["splits"] == dict(Counter(r[SPLIT] for r in kept))

    # an interrupted run of the same configuration: the written parts stay, the rest is decided again,
    # and the result is the same rows (the plan is deterministic for the seed)
    written = {(r["id"], r[SPLIT]) for r in kept} | {(r["id"], r[RULE]) for r in rejects}
    fs.delete(store.file(MANIFEST))
    fs.write_json(store.file(ATTEMPT), manifest["fingerprint"])
    lost = store.file(manifest["files"][0])
    lost_rows = pq.read_metadata(lost).num_rows
    fs.delete(lost)
    again = run_stage(cfg, "curate")
    assert again["rows_out"] == manifest["rows_out"] and again["rows_rejected"] == manifest["rows_rejected"] and lost_rows
    assert {(r["id"], r[SPLIT]) for r in store.read().to_pylist()} | {
        (r["id"], r[RULE]) for r in store.read_rejects().to_pylist()} == written
