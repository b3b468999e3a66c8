"""The label processor on the real embedded model, without Ray: modes, score choice, calibration, rejects."""

from __future__ import annotations

import math

import pytest

from themis_ray import judging
from themis_ray.config import EngineConfig, SamplingConfig
from themis_ray.schema import REJECT, REJECT_CODE, output_schema
from themis_ray.judging import judge_mode
from themis_ray.stages.label import Labeler


def test_score_options_and_choice_distribution_by_hand():
    assert judging.score_options(judging.RatingScale(1, 3)) == ["1]]", "2]]", "3]]"]
    # log-probs ln(1), ln(3): probabilities 1/4 and 3/4 whatever the shared offset.
    dist = judging.choice_distribution([math.log(1) - 7, math.log(3) - 7], judging.RatingScale(0, 1))
    assert dist == pytest.approx({0: 0.25, 1: 0.75})


def test_judge_mode_uses_a_reference_only_where_it_helps():
    assert judge_mode({"scenario": "math_qa", "reference": "42"}) == "reference"
    assert judge_mode({"scenario": "math_qa", "reference": None}) == "single"
    assert judge_mode({"scenario": "creative_writing", "reference": "a poem"}) == "single"  # open-ended


def rows():
    base = {"instruction": "What is 2+2?", "scenario": "math_qa", "reference": "4"}
    return [
        {**base, "id": "r1", "response": "2+2 equals 4."},
        {**base, "id": "r2", "response": "It is 5, obviously."},
        {**base, "id": "r3", "response": "   "},  # nothing to judge: a reject with the reason
    ]


@pytest.fixture(scope="module")
def labeler_factory():
    import pyarrow as pa

    schema = output_schema("label", pa.schema([("id", pa.string()), ("instruction", pa.string()),
                                                ("scenario", pa.string()), ("reference", pa.string()),
                                                ("response", pa.string())]))

    def make(**kwargs):
        args = dict(engine_cfg=EngineConfig(), sampling=SamplingConfig(max_tokens=8), score_by="choice",
                    calibrate=False, prefill=False, max_attempts=1, retry_temperature=0.7, scenarios_dir=None)
        return Labeler(schema, **{**args, **kwargs})

    return make


@pytest.mark.integration  # loads the real model
def test_choice_mode_labels_every_judgeable_row_and_rejects_the_rest(labeler_factory):
    labeler = labeler_factory()
    out = labeler.process(rows())
    assert [r["response_id"] for r in out] == ["r1", "r2", "r3"]
    good, bad = out[:2], out[2]
    for row in good:
        assert row[REJECT] is None
        assert row["mode"] == "reference"
        assert row["evaluation"].startswith(f"[[{int(row['score'])}]]")
        assert sum(row["score_distribution"]) == pytest.approx(1)
        # The chosen score is the distribution's most probable one.
        assert row["score"] == 1 + max(range(5), key=row["score_distribution"].__getitem__)
        assert "[Reference answer start]" in row["prompt"]
    assert bad[REJECT].startswith("bad record: response is empty") and bad[REJECT_CODE] == "bad_record"
    assert bad.get("score") is None  # null once the schema writes it


@pytest.mark.integration  # loads the real model
def test_without_a_rationale_the_chosen_score_is_the_whole_evaluation(labeler_factory):
    with_text, score_only = labeler_factory(), labeler_factory(score_by="text", rationale=False)
    expected = with_text.process(rows())
    out = score_only.process(rows())
    for row, reference in zip(out[:2], expected[:2]):
        # The same choice as score_by=choice, and nothing generated after it.
        assert row["evaluation"] == f"[[{int(row['score'])}]]" and row["completion_tokens"] == 0
        assert row["score_distribution"] == pytest.approx(reference["score_distribution"], abs=1e-6)
        assert row["score"] == reference["score"] and row[REJECT] is None
    assert out[2][REJECT].startswith("bad record: response is empty")


@pytest.mark.integration  # loads the real model
def test_a_record_too_long_to_score_is_a_reject_not_a_failed_batch(labeler_factory):
    short = EngineConfig(max_model_len=300)  # the five-part prompt alone is ~400 tokens
    for labeler in (labeler_factory(engine_cfg=short), labeler_factory(engine_cfg=short, rationale=False)):
        out = labeler.process(rows())
        assert [r[REJECT].split(":")[0] for r in out] == ["engine error", "engine error", "bad record"]
        assert "max_model_len=300" in out[0][REJECT]


@pytest.mark.integration  # loads the real model
def test_calibration_divides_out_the_content_free_prior(labeler_factory):
    plain, calibrated = labeler_factory(), labeler_factory(calibrate=True)
    [p] = plain.process(rows()[:1])
    [c] = calibrated.process(rows()[:1])
    # The prior: the same options after the prompt of a content-free record ("N/A") of the row's kind.
    prior = calibrated._score_logprobs(judging.content_free_prompt(c["scenario"], c["mode"]))
    assert calibrated.calibration.priors[(c["scenario"], c["mode"])] == pytest.approx(prior, abs=1e-5)
    expected = judging.choice_distribution(
        [lp - q for lp, q in zip(calibrated._score_logprobs(c["prompt"]), prior)])
    assert c["score_distribution"] == pytest.approx([expected[s] for s in range(1, 6)], abs=1e-6)
    assert c["score_distribution"] != pytest.approx(p["score_distribution"], abs=1e-3)


@pytest.mark.integration  # loads the real model
def test_text_mode_keeps_unparsable_answers_as_rejects_with_the_raw_text(labeler_factory):
    # Eight tokens without a prefill: the base model does not open with [[n]] here.
    labeler = labeler_factory(score_by="text", max_attempts=2)
    out = labeler.process(rows()[:2])
    for row in out:
        if row[REJECT] is not None:
            assert row[REJECT].startswith("unparsable evaluation") and row[REJECT_CODE] == "unparsable"
            assert row["evaluation"]  # the raw answer is kept
            assert row["attempts"] == 2
        else:
            assert judging.parse_evaluation(row["evaluation"]).score == row["score"]


def test_cost_is_priced_per_record_from_its_tokens_over_every_attempt():
    import sys
    from pathlib import Path

    import pyarrow as pa

    sys.path.insert(0, str(Path(__file__).parent))
    from openai_server import OpenAIServer

    calls = {"n": 0}

    def answer(messages):  # the first answer has no score, so the record is asked twice
        calls["n"] += 1
        return "no score here" if calls["n"] == 1 else "[[3]] Fine."

    schema = output_schema("label", pa.schema([("id", pa.string()), ("instruction", pa.string()),
                                                ("scenario", pa.string()), ("response", pa.string())]))
    with OpenAIServer(answer=answer) as server:
        engine = EngineConfig(kind="openai", base_url=server.base_url, model="teacher", max_retries=0,
                              usd_per_1k_prompt_tokens=2.5, usd_per_1k_completion_tokens=10.0)
        labeler = Labeler(schema, engine_cfg=engine, sampling=SamplingConfig(max_tokens=16), score_by="text",
                          calibrate=False, prefill=False, max_attempts=2, retry_temperature=0.7, scenarios_dir=None)
        try:
            [row] = labeler.process([{"id": "r1", "instruction": "Name a colour.", "scenario": "open_qa",
                                      "response": "Blue."}])
        finally:
            labeler.engine.close()
    assert row[REJECT] is None and row["score"] == 3 and row["attempts"] == 2
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] == len("no score here".split()) + 2
    assert row["cost_usd"] == pytest.approx((row["prompt_tokens"] * 2.5 + row["completion_tokens"] * 10.0) / 1000)


def test_label_stats_count_accepted_pointwise_scores_and_every_paid_token():
    import pyarrow as pa

    from themis_ray.stages.label import label_stats

    accepted = pa.table({
        "responder": ["careful", "careful", "careless", "careless", "careless"],
        "score": [5.0, 4.0, 1.0, None, None],
        "mode": ["single", "reference", "single", "single", "pairwise"],
        "verdict_consistent": [None, None, None, None, True],
        "prompt_tokens": [10, 10, 10, 10, 20], "completion_tokens": [3, 3, 3, 3, 6], "cost_usd": [0.1] * 5,
    })
    stats = label_stats(accepted, rejected=False)
    # score-less rows and pairwise verdicts are not scores; the consistent pair is counted apart
    assert stats["score_histogram_by_responder"] == {"careful": {"4": 1, "5": 1}, "careless": {"1": 1}}
    assert stats["pairwise_consistent"] == 1
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (60, 18) and stats["cost_usd"] == pytest.approx(0.5)
    # Rejects were paid for too, but they add no score.
    assert label_stats(accepted.slice(0, 2), rejected=True) == {"prompt_tokens": 20, "completion_tokens": 6,
                                                                "cost_usd": pytest.approx(0.2)}
    # A user's own responses table need not say who wrote them.
    anonymous = label_stats(accepted.drop_columns(["responder"]), rejected=False)
    assert anonymous["score_histogram_by_responder"] == {"None": {"1": 1, "4": 1, "5": 1}}
