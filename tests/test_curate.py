"""Curation rules on hand-built frames (IFD, z-score, top-k%, rebalancing, mix, pairwise, split) and the stage."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from themis_ray import judging
from themis_ray.config import CurateConfig
from themis_ray.scenarios import get_scenario
from themis_ray.schema import REJECT
from themis_ray.stages.curate import apply_rules

OFF = dict(drop_ifd_above_one=False, keep_top_percent=100.0, max_ifd_zscore=None, rebalance=False)


def _df(rows):
    """rows: (scenario, ifd, score)."""
    return pd.DataFrame(
        {"id": [f"r{i}" for i in range(len(rows))], "scenario": [r[0] for r in rows],
         "ifd": [float(r[1]) for r in rows], "score": [float(r[2]) for r in rows]}
    )


def _reasons(out):
    return dict(zip(out["id"], out[REJECT]))


def _check_accounting(df, out):
    assert len(out) == len(df) and list(out["id"]) == list(df["id"])
    kept, rejected = out[REJECT].isna(), out[REJECT].notna()
    assert kept.sum() + rejected.sum() == len(df)
    assert set(out.loc[kept, "split"]) <= {"train", "validation"}
    assert out.loc[kept, "split"].notna().all()
    assert out.loc[rejected, "split"].isna().all()
    assert REJECT not in df.columns and "split" not in df.columns  # the input is not modified


def test_ifd_above_one_is_dropped_with_its_reason():
    df = _df([("a", 0.5, 3), ("a", 1.0, 3), ("a", 1.01, 4), ("b", 3.2, 5), ("b", 0.9, 4)])
    out = apply_rules(df, CurateConfig(**{**OFF, "drop_ifd_above_one": True}))
    reasons = _reasons(out)
    assert reasons["r2"].startswith("IFD > 1") and reasons["r3"].startswith("IFD > 1")
    assert reasons["r0"] is None and reasons["r1"] is None and reasons["r4"] is None  # exactly 1 is kept
    _check_accounting(df, out)


def test_ifd_rule_off_keeps_everything():
    df = _df([("a", 1.5, 3), ("a", 0.5, 3)])
    out = apply_rules(df, CurateConfig(**OFF))
    assert out[REJECT].isna().all()


def test_zscore_is_per_scenario_and_needs_three_records():
    rows = [("a", 0.1, 3)] * 9 + [("a", 0.9, 3)]  # r9: mean 0.18, sd 0.253 -> z = 2.85
    rows += [("a", 5.0, 3)]  # r10: dropped by IFD > 1 first, so it must not count in a's statistics
    rows += [("b", 0.1, 3), ("b", 0.9, 3)]  # r11, r12: z = -/+0.71 but only two records
    rows += [("c", 0.1, 3), ("c", 0.1, 3), ("c", 0.9, 3)]  # r13..r15: z = -0.58, -0.58, 1.15
    df = _df(rows)
    out = apply_rules(df, CurateConfig(**{**OFF, "drop_ifd_above_one": True, "max_ifd_zscore": 0.6}))
    reasons = _reasons(out)
    dropped = {k for k, v in reasons.items() if v}
    assert dropped == {"r9", "r10", "r15"}
    assert reasons["r9"] == "IFD z-score within scenario > 0.6"
    assert reasons["r15"] == "IFD z-score within scenario > 0.6"
    assert reasons["r10"].startswith("IFD > 1")  # the first rule that drops a record names it
    _check_accounting(df, out)


def test_zscore_threshold_by_hand():
    # a: nine 0.1 and one 0.9 -> the 0.9 has z = 0.72 / sqrt(0.576 / 9) = 2.846
    rows = [("a", 0.1, 3)] * 9 + [("a", 0.9, 3)]
    assert (0.9 - np.mean([r[1] for r in rows])) / np.std([r[1] for r in rows], ddof=1) == pytest.approx(2.846, abs=1e-3)
    kept_at_3 = apply_rules(_df(rows), CurateConfig(**{**OFF, "max_ifd_zscore": 3.0}))
    assert kept_at_3[REJECT].isna().all()
    out = apply_rules(_df(rows), CurateConfig(**{**OFF, "max_ifd_zscore": 2.8}))
    assert _reasons(out) == {**{f"r{i}": None for i in range(9)}, "r9": "IFD z-score within scenario > 2.8"}


def test_keep_top_percent_keeps_the_hardest():
    ifds = [0.30, 0.90, 0.10, 0.70, 0.50, 0.20, 0.80]
    df = _df([("a" if i % 2 else "b", v, 3) for i, v in enumerate(ifds)])
    out = apply_rules(df, CurateConfig(**{**OFF, "keep_top_percent": 50.0}))
    # ceil(7 * 0.5) = 4 kept: 0.9, 0.8, 0.7, 0.5
    kept = set(out.loc[out[REJECT].isna(), "ifd"])
    assert kept == {0.9, 0.8, 0.7, 0.5}
    assert set(out.loc[out[REJECT].notna(), REJECT]) == {"IFD below the top 50%"}
    _check_accounting(df, out)


def test_keep_top_percent_counts_only_records_still_in():
    # 1.5 and 1.2 are dropped by IFD > 1 first; then 4 remain and 50% keeps the top 2 of those
    df = _df([("a", 1.5, 3), ("a", 1.2, 3), ("a", 0.9, 3), ("a", 0.8, 3), ("a", 0.4, 3), ("a", 0.3, 3)])
    out = apply_rules(df, CurateConfig(**{**OFF, "drop_ifd_above_one": True, "keep_top_percent": 50.0}))
    assert list(out[REJECT].str.split(":").str[0].fillna("kept")) == [
        "IFD > 1", "IFD > 1", "kept", "kept", "IFD below the top 50%", "IFD below the top 50%"]


def test_rebalance_caps_a_dominant_score():
    rows = [("x", 0.5, 5)] * 8 + [("x", 0.5, 4.6)] * 2 + [("x", 0.5, 4)] * 2 + [("x", 0.5, 3)]
    rows += [("y", 0.5, 4)] * 3 + [("y", 0.5, 2)] * 3
    df = _df(rows)
    out = apply_rules(df, CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 2.0}))
    kept = out[out[REJECT].isna()]
    x = Counter(kept.loc[kept["scenario"] == "x", "score"].round().astype(int))
    # x: score 5 has 10 (4.6 rounds to 5), 4 has 2, 3 has 1 -> cap = 2 x 1 = 2 for each score
    assert x == {5: 2, 4: 2, 3: 1}
    y = Counter(kept.loc[kept["scenario"] == "y", "score"].round().astype(int))
    assert y == {4: 3, 2: 3}  # balanced already: nothing dropped
    assert set(out.loc[out[REJECT].notna(), REJECT]) == {"rebalanced: score 5 over-represented in x"}
    assert out[REJECT].notna().sum() == 8
    _check_accounting(df, out)


def test_rebalance_ratio_rounds_up():
    rows = [("x", 0.5, 1)] * 2 + [("x", 0.5, 5)] * 9
    out = apply_rules(_df(rows), CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 1.5}))
    kept = out[out[REJECT].isna()]
    assert Counter(kept["score"].astype(int)) == {1: 2, 5: 3}  # ceil(2 x 1.5) = 3


def test_split_is_stratified_by_scenario():
    df = _df([("a", 0.5, 3)] * 8 + [("b", 0.5, 3)] * 4 + [("c", 0.5, 3)] * 12)
    out = apply_rules(df, CurateConfig(**{**OFF, "validation_fraction": 0.25}))
    counts = out.groupby(["scenario", "split"]).size().to_dict()
    assert counts == {("a", "train"): 6, ("a", "validation"): 2, ("b", "train"): 3, ("b", "validation"): 1,
                      ("c", "train"): 9, ("c", "validation"): 3}
    _check_accounting(df, out)


def test_split_is_reproducible_and_seeded():
    df = _df([("a", 0.5, 3)] * 40)
    a = apply_rules(df, CurateConfig(**{**OFF, "seed": 1}))["split"].tolist()
    b = apply_rules(df, CurateConfig(**{**OFF, "seed": 1}))["split"].tolist()
    c = apply_rules(df, CurateConfig(**{**OFF, "seed": 2}))["split"].tolist()
    assert a == b and a != c


@pytest.mark.parametrize("rows", [[("a", 0.5, 3)] * 2, [("a", 0.5, 3), ("b", 0.5, 3)]])
def test_tiny_sets_get_both_splits(rows):
    out = apply_rules(_df(rows), CurateConfig(**{**OFF, "validation_fraction": 0.25}))
    assert sorted(out["split"]) == ["train", "validation"]


def test_tiny_set_with_large_fraction_still_has_train():
    out = apply_rules(_df([("a", 0.5, 3)] * 3), CurateConfig(**{**OFF, "validation_fraction": 0.9}))
    assert Counter(out["split"]) == {"validation": 2, "train": 1}


def test_single_record_and_empty_frame():
    out = apply_rules(_df([("a", 0.5, 3)]), CurateConfig(**OFF))
    assert out["split"].tolist() == ["train"]
    empty = apply_rules(_df([]), CurateConfig())
    assert len(empty) == 0


def test_all_rules_together_account_for_every_row():
    rng = np.random.default_rng(7)
    rows = []
    for scenario in ("a", "b", "c"):
        for _ in range(40):
            rows.append((scenario, float(rng.uniform(0.2, 1.3)), int(rng.choice([1, 2, 3, 4, 5], p=[.05, .1, .15, .2, .5]))))
    rows.append(("a", 0.999, 5))
    df = _df(rows)
    cfg = CurateConfig(keep_top_percent=80.0, max_ifd_zscore=1.5, rebalance=True, rebalance_max_ratio=2.0)
    out = apply_rules(df, cfg)
    _check_accounting(df, out)
    reasons = out[REJECT].dropna()
    assert (out.loc[out["ifd"] > 1, REJECT].str.startswith("IFD > 1")).all()
    assert set(reasons.str.split(":").str[0]) <= {"IFD > 1", "IFD z-score within scenario > 1.5",
                                                  "IFD below the top 80%", "rebalanced"}
    kept = out[out[REJECT].isna()]
    assert (kept["ifd"] <= 1).all()
    for _, group in kept.groupby("scenario"):
        counts = group["score"].round().value_counts()
        assert counts.max() <= np.ceil(counts.min() * 2.0)
    assert {"train", "validation"} <= set(kept["split"])


# ------------------------------------------------------------- target histogram, mix, measure


def test_rebalance_toward_a_target_histogram():
    rows = [("x", 0.5, 1)] * 4 + [("x", 0.5, 3)] * 10 + [("x", 0.5, 5)] * 10 + [("x", 0.5, 4)] * 3
    out = apply_rules(_df(rows), CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 1.0,
                                                "rebalance_target": [1, 0, 1, 0, 2]}))
    kept = Counter(out.loc[out[REJECT].isna(), "score"].astype(int))
    # shares 1/4, 1/4, 1/2 for scores 1, 3, 5 -> the scarcest relative to its share is score 1 (4 / 0.25)
    assert kept == {1: 4, 3: 4, 5: 8}  # score 4 has target weight 0: all of it goes
    assert set(out.loc[out["score"] == 4, REJECT]) == {"rebalanced: score 4 over-represented in x"}


def test_rebalance_target_must_match_the_scale():
    with pytest.raises(ValueError, match="rebalance_target needs 5"):
        apply_rules(_df([("x", 0.5, 1)] * 3), CurateConfig(**{**OFF, "rebalance": True, "rebalance_target": [1, 1]}))


def test_scenario_mix_weights():
    df = _df([("a", 0.5, 3)] * 20 + [("b", 0.5, 3)] * 10 + [("c", 0.5, 3)] * 5 + [("d", 0.5, 3)] * 4)
    out = apply_rules(df, CurateConfig(**{**OFF, "scenario_weights": {"a": 2.0, "b": 1.0, "d": 0.0}}))
    kept = Counter(out.loc[out[REJECT].isna(), "scenario"])
    # a : b : c = 2 : 1 : 1 (c unlisted weighs 1), limited by c's 5 records; d weighs 0
    assert kept == {"a": 10, "b": 5, "c": 5}
    assert set(out.loc[out[REJECT].notna(), REJECT]) == {"scenario mix: a above its weight",
                                                         "scenario mix: b above its weight",
                                                         "scenario mix: d above its weight"}
    _check_accounting(df, out)


def test_perplexity_measure_uses_its_own_column():
    df = _df([("a", v, 3) for v in (0.9, 0.8, 0.7, 0.6)])
    df["ifd_ppl"] = [0.5, 0.6, 0.7, 0.8]  # the opposite order
    cfg = {**OFF, "keep_top_percent": 50.0}
    loss = apply_rules(df, CurateConfig(**cfg))
    ppl = apply_rules(df, CurateConfig(**{**cfg, "ifd_measure": "perplexity"}))
    assert list(loss[REJECT].isna()) == [True, True, False, False]
    assert list(ppl[REJECT].isna()) == [False, False, True, True]
    with pytest.raises(ValueError, match="ifd_measure"):
        apply_rules(df, CurateConfig(**{**cfg, "ifd_measure": "bits"}))


def test_step_counts_follow_the_rules_in_order():
    from themis_ray.stages.curate import step_counts

    rows = [("a", 1.5, 5)] + [("a", 0.5, 5)] * 6 + [("a", 0.4, 3)] * 2 + [("b", 0.5, 2)] * 3
    out = apply_rules(_df(rows), CurateConfig(**{**OFF, "drop_ifd_above_one": True, "rebalance": True,
                                                "rebalance_max_ratio": 1.0}))
    steps = {s["step"]: s for s in step_counts(out)}
    assert steps["labelled"]["remaining"] == 12
    assert steps["Cherry: IFD > 1"]["dropped"] == 1 and steps["Cherry: IFD > 1"]["by_scenario"] == {"a": 8, "b": 3}
    assert steps["score rebalancing"]["dropped"] == 4  # a: six 5s capped at two 3s
    assert steps["scenario mix"]["remaining"] == out[REJECT].isna().sum() == 7
    assert [s["step"] for s in step_counts(out)][0] == "labelled"


# ------------------------------------------------------------------------------------ pairwise


def _pairs(verdicts, scenario="p"):
    return pd.DataFrame({"id": [f"p{i}" for i in range(len(verdicts))], "scenario": scenario, "mode": "pairwise",
                         "ifd": 0.5, "score": np.nan, "verdict": list(verdicts)})


def test_pairwise_balance_counts_ties_twice_when_pairs_are_swapped():
    df = _pairs("AAAAAABBC")
    out = apply_rules(df, CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 1.0}))
    kept = out[out[REJECT].isna()]
    assert Counter(kept["verdict"].map({"A": "AB", "B": "AB", "C": "C"})) == {"AB": 2, "C": 1}
    assert set(out[REJECT].dropna()) == {"pairwise balance: verdict A or B over-represented in p"}
    rows = kept.to_dict("records")
    final = [r["verdict"] for r in rows] + [_SWAP[r["verdict"]] for r in rows]
    assert Counter(final) == {"A": 2, "B": 2, "C": 2}  # balanced once each pair is also added swapped
    _check_accounting(df, out)


_SWAP = {"A": "B", "B": "A", "C": "C"}


def test_pairwise_balance_without_swapping_balances_each_verdict():
    df = _pairs("AAAAAABBCCCC")
    out = apply_rules(df, CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 1.0, "swap_pairwise": False}))
    assert Counter(out.loc[out[REJECT].isna(), "verdict"]) == {"A": 2, "B": 2, "C": 2}


def test_pairwise_rows_skip_score_rebalancing():
    df = pd.concat([_df([("x", 0.5, 5)] * 4 + [("x", 0.5, 1)]), _pairs("AB", scenario="x")], ignore_index=True)
    out = apply_rules(df, CurateConfig(**{**OFF, "rebalance": True, "rebalance_max_ratio": 1.0}))
    assert out.loc[out["mode"] == "pairwise", REJECT].isna().all()
    assert (out.loc[out["mode"] != "pairwise", REJECT].notna()).sum() == 3


# ------------------------------------------------------------------------------ the stage, end to end


def _label_rows(n_per_scenario: int = 12):
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
                         "prompt": judging.render_prompt(request), "evaluation": evaluation,
                         "score": float(overall), "criterion_scores": [float(s) for s in scores],
                         "score_distribution": [0.2] * 5, "expected_score": 3.0,
                         "ifd": float(rng.uniform(0.3, 1.2)), "ifd_ppl": float(rng.uniform(0.3, 1.2))})
    rows.append({**rows[0], "id": "outlier", "ifd": 0.999})
    return pa.Table.from_pylist(rows)


def test_curate_stage_commits_counts_report_and_copies(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from themis_ray.config import PipelineConfig
    from themis_ray.stages import augment as aug
    from themis_ray.stages import curate
    from themis_ray.store import StageStore

    def fake_pool(criteria, cfg):  # the model's paraphrases, without starting Ray
        rows = [{**r, "paraphrase": f"Said otherwise: {r['description'].lower()}", REJECT: None}
                for r in criteria.to_pylist()]
        return pa.Table.from_pylist(rows, schema=aug.PARAPHRASE_SCHEMA)

    monkeypatch.setattr(curate, "_paraphrase_on_pool", fake_pool)
    cfg = OmegaConf.structured(PipelineConfig)
    cfg.run_dir = str(tmp_path)
    cfg.curate.augment.paraphrase_fraction = 0.2
    cfg.curate.augment.drop_criteria_fraction = 0.5
    cfg.curate.augment.rescale_fraction = 0.5
    cfg.curate.augment.min_regression_records = 3
    source = _label_rows()
    store = StageStore(tmp_path, "curate")
    staging = store.staging_dir()
    result = curate.run(cfg, {"ifd": source}, staging)
    manifest = store.commit(result, {"test": 1}, 0.0, staging)

    kept = store.read().to_pylist()
    originals = [r for r in kept if r[aug.AUGMENTATION] is None]
    copies = [r for r in kept if r[aug.AUGMENTATION] is not None]
    rejects = store.read_rejects().to_pylist()
    assert len(originals) + len(rejects) == source.num_rows == manifest["rows_in"]
    assert manifest["units_ok"] == len(originals) and manifest["rows_out"] == len(kept)
    assert sum(manifest["augmented"].values()) == len(copies) > 0
    assert all(r["split"] == "train" for r in copies)
    assert {r["id"] for r in originals} <= set(source["id"].to_pylist())
    assert len({r["id"] for r in kept}) == len(kept)
    assert all(r["reject_reason"] for r in rejects)
    steps = manifest["steps"]
    assert steps[0] == {"step": "labelled", "dropped": 0, "remaining": source.num_rows}
    assert steps[-1]["remaining"] == len(originals)
    assert sum(s["dropped"] for s in steps) == len(rejects)
    assert manifest["splits"] == dict(Counter(r["split"] for r in kept))
    assert manifest["criteria_regression"]["regressions"] >= 1
    assert manifest["paraphrases"]["usable"] == manifest["paraphrases"]["asked"] > 0
    for name in ("report.md", "distributions.png", "ifd_by_scenario.png", "scores_by_scenario.png"):
        assert (store.path / name).stat().st_size > 0, name
    report = (store.path / "report.md").read_text()
    assert "| labelled | 0 | 25 |" in report and "![IFD per scenario](ifd_by_scenario.png)" in report
    assert "dropped criteria" in report and "validation MAE" in report
