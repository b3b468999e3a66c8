"""IFD from log-probabilities; the hf engine's shared-prefix scoring and the ifd stage against a plain reference."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from themis_ray import judging
from themis_ray.engines import Engine
from themis_ray.engines.hf import SharedPrefixScorer, _common_prefix
from themis_ray.schema import REJECT, output_schema
from themis_ray.stages import ifd as ifd_stage
from themis_ray.stages.ifd import ifd_from_logprobs


def test_ifd_from_logprobs_by_hand():
    cond = [-0.5, -1.0, -1.5]  # mean CE 1.0
    alone = [-2.0, -2.0, -2.0]  # mean CE 2.0
    got = ifd_from_logprobs(cond, alone)
    assert got["ce_conditioned"] == pytest.approx(1.0)
    assert got["ce_answer"] == pytest.approx(2.0)
    assert got["ifd"] == pytest.approx(0.5)
    assert got["ifd_ppl"] == pytest.approx(math.exp(1.0) / math.exp(2.0))
    assert got["answer_tokens"] == 3


def test_ifd_above_one_when_the_prompt_hurts():
    got = ifd_from_logprobs([-3.0, -1.0], [-1.0, -1.0])
    assert got["ifd"] == pytest.approx(2.0) and got["ifd_ppl"] == pytest.approx(math.e)


def test_ifd_zero_unconditioned_loss_is_infinite():
    got = ifd_from_logprobs([-0.1], [0.0])
    assert got["ifd"] == math.inf
    assert got["ifd_ppl"] == pytest.approx(math.exp(0.1))


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="3 vs 2"):
        ifd_from_logprobs([-1.0, -1.0, -1.0], [-1.0, -1.0])


# ------------------------------------------------------------------------------------ real model


def _reference_logprobs(engine, prompt, completion):
    """One record at a time, no padding: a full forward of prompt + completion ids."""
    p, c = engine.prompt_ids(prompt), engine.text_ids(completion)
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    # the token at index t is predicted by position t - 1
    return [logp[len(p) + j - 1, tok].item() for j, tok in enumerate(c)]


RECORDS = [
    ([{"role": "user", "content": "Rate this answer."}], "[[4]]"),
    (None, "[[2]] The response misses the date entirely and rambles about unrelated history."),
    (
        [{"role": "system", "content": "You are a strict judge."},
         {"role": "user", "content": "Grade the response below to the user instruction in the scenario "
          "\"Closed question answering\". " + "The instruction asks for the capital of France. " * 12
          + "[Response start]\nParis is the capital.\n[Response end]"}],
        "[[5]] Correct and direct.",
    ),
    ([{"role": "user", "content": "Hi"}], "Hello! " * 30 + "How can I help you today with your questions?"),
]


@pytest.mark.integration  # loads the real model
def test_prompt_ids_none_is_a_single_begin_token(hf_engine):
    tok = hf_engine.tokenizer
    expected = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert hf_engine.prompt_ids(None) == [expected]


@pytest.mark.integration  # loads the real model
@pytest.mark.parametrize("micro_batch_size,share_prefix", [(8, True), (2, False)])
def test_token_logprobs_equal_one_at_a_time_reference(hf_engine, micro_batch_size, share_prefix):
    prompts = [p for p, _ in RECORDS]
    completions = [c for _, c in RECORDS]
    lengths = [len(hf_engine.prompt_ids(p)) + len(hf_engine.text_ids(c)) for p, c in RECORDS]
    assert max(lengths) > 3 * min(lengths)  # very different lengths, so padding matters
    got = hf_engine.token_logprobs(prompts, completions, micro_batch_size=micro_batch_size, max_padding=1.0,
                                   share_prefix=share_prefix)
    assert len(got) == len(RECORDS)
    for (prompt, completion), scores in zip(RECORDS, got):
        assert scores.error is None
        want = _reference_logprobs(hf_engine, prompt, completion)
        assert len(scores.logprobs) == len(want) == len(hf_engine.text_ids(completion))
        assert scores.num_prompt_tokens == len(hf_engine.prompt_ids(prompt))
        assert max(abs(a - b) for a, b in zip(scores.logprobs, want)) < 1e-4
        assert all(lp <= 0 for lp in scores.logprobs)


@pytest.mark.integration  # loads the real model
def test_token_logprobs_per_item_errors(hf_engine):
    long_prompt = [{"role": "user", "content": "word " * 2100}]
    got = hf_engine.token_logprobs([RECORDS[0][0], RECORDS[0][0], long_prompt], ["", RECORDS[0][1], "[[3]]"])
    assert got[0].logprobs is None and "empty" in got[0].error
    assert got[1].error is None
    assert max(abs(a - b) for a, b in zip(got[1].logprobs, _reference_logprobs(hf_engine, *RECORDS[0]))) < 1e-4
    assert got[2].logprobs is None and "max_model_len" in got[2].error


@pytest.mark.integration  # loads the real model
def test_choice_logprobs_equals_base_implementation(hf_engine):
    prompt = [{"role": "user", "content": "Which scenario is this instruction in? Translate 'cat' into German."}]
    options = ["translation", "close_qa", "creative_writing", "math"]
    fast = hf_engine.choice_logprobs(prompt, options)
    base = Engine.choice_logprobs(hf_engine, prompt, options)
    assert len(fast) == len(base) == 4
    assert max(abs(a - b) for a, b in zip(fast, base)) < 1e-4
    # and both equal the plain reference sum
    for option, total in zip(options, fast):
        assert total == pytest.approx(sum(_reference_logprobs(hf_engine, prompt, option)), abs=1e-4)


@pytest.mark.integration  # loads the real model
def test_choice_logprobs_after_a_prefill_equals_base_implementation(hf_engine):
    # the label stage's score_by=choice: options "1]]".."10]]" after an assistant message "[[". The
    # tokenizer splits numbers into digits, so "10]]" starts with the same token as "1]]": a score read
    # from first tokens would confuse them; each option's whole token sequence must be scored.
    prompt = [{"role": "user", "content": "Grade the response 'Paris' to 'Capital of France?' from 1 to 10."},
              {"role": "assistant", "content": "[["}]
    options = judging.score_options(judging.RatingScale(1, 10))
    assert hf_engine.text_ids("10]]")[0] == hf_engine.text_ids("1]]")[0]  # digits split: a shared first token
    fast = hf_engine.choice_logprobs(prompt, options)
    base = Engine.choice_logprobs(hf_engine, prompt, options)
    assert max(abs(a - b) for a, b in zip(fast, base)) < 1e-4
    for option, total in zip(options, fast):
        assert total == pytest.approx(sum(_reference_logprobs(hf_engine, prompt, option)), abs=1e-4)
    assert fast[0] != pytest.approx(fast[9], abs=1e-3)  # "1]]" and "10]]" told apart


# ------------------------------------------------------------------------------ the stage itself


def _eval_record(i, scenario, response, evaluation):
    request = judging.JudgeRequest(instruction=f"Question {i}: what does this code do?", response=response,
                                   scenario=scenario)
    return {"id": f"r{i}", "scenario": scenario, "mode": "single", "prompt": judging.render_prompt(request),
            "evaluation": evaluation}


STAGE_RECORDS = [
    _eval_record(0, "programming", "It prints.", "[[2]] Too short."),
    _eval_record(1, "programming", "The loop walks the list and sums every even element. " * 40,
                 "[[4]] Correct and explains the loop.\nCorrectness: [[4]] right.\nClarity: [[5]] easy to follow. " * 3),
    _eval_record(2, "programming", "It sorts the list in place with a quicksort.", "[[3]] Partly right."),
    _eval_record(3, "open_qa", "Use a virtual environment. " * 30, "[[5]] Thorough advice on environments."),
]


def _reference_ifd(engine, record):
    """One record at a time, two plain forward passes, as the original IFD code scores."""
    conditioned = _reference_logprobs(engine, judging.build_messages(record["prompt"]), record["evaluation"])
    alone = _reference_logprobs(engine, None, record["evaluation"])
    return ifd_from_logprobs(conditioned, alone)


def _scorer(hf_engine, monkeypatch, **kwargs):
    monkeypatch.setattr(ifd_stage, "build_engine", lambda cfg: hf_engine)
    schema = output_schema("ifd", pa.schema([("id", pa.string())]))
    return ifd_stage.IFDScorer(schema, engine_cfg=None, **kwargs)


@pytest.mark.integration  # loads the real model
@pytest.mark.parametrize("share_prefix,micro_batch_size,max_padding", [(True, 1, 0.1), (True, 4, 1.0), (False, 4, 1.0)])
def test_stage_ifd_equals_per_record_reference(hf_engine, monkeypatch, share_prefix, micro_batch_size, max_padding):
    lengths = [len(hf_engine.prompt_ids(judging.build_messages(r["prompt"]))) + len(hf_engine.text_ids(r["evaluation"]))
               for r in STAGE_RECORDS]
    assert max(lengths) > 2 * min(lengths)  # very different lengths, so padding and sorting matter
    calls = []
    original = SharedPrefixScorer._score
    monkeypatch.setattr(SharedPrefixScorer, "_score",
                        lambda self, group, shared: calls.append((len(group), shared)) or original(self, group, shared))
    scorer = _scorer(hf_engine, monkeypatch, micro_batch_size=micro_batch_size, max_padding=max_padding,
                     share_prefix=share_prefix)
    out = scorer.process(STAGE_RECORDS)
    assert [o["id"] for o in out] == [r["id"] for r in STAGE_RECORDS]
    conditioned = calls[:-1]  # the last call is the unconditioned pass: nothing shared, all 4 answers
    assert calls[-1] == (4, 0)
    if share_prefix:
        # the three programming records share their prompt's opening; open_qa has none to share with
        assert [n for n, _ in conditioned] == [3, 1] and conditioned[0][1] > 100 and conditioned[1][1] == 0
    else:
        assert conditioned == [(4, 0)]
    for record, got in zip(STAGE_RECORDS, out):
        want = _reference_ifd(hf_engine, record)
        assert got[REJECT] is None
        assert got["answer_tokens"] == want["answer_tokens"] == len(hf_engine.text_ids(record["evaluation"]))
        for key in ("ce_conditioned", "ce_answer", "ifd", "ifd_ppl"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_micro_batches_respect_size_and_padding_budget():
    scorer = SharedPrefixScorer(engine=None, micro_batch_size=3, max_padding=0.1)
    lengths = [100, 10, 98, 95, 11, 50, 99]
    batches = scorer.micro_batches(lengths)
    assert sorted(k for b in batches for k in b) == list(range(len(lengths)))
    assert [[lengths[k] for k in b] for b in batches] == [[10, 11], [50], [95, 98, 99], [100]]
    assert SharedPrefixScorer(None, micro_batch_size=1).micro_batches([5, 5, 5]) == [[0], [1], [2]]


@pytest.mark.integration  # loads the real model
def test_stage_rejects_what_cannot_be_scored_with_the_reason(hf_engine, monkeypatch):
    scorer = _scorer(hf_engine, monkeypatch)
    too_long = {**STAGE_RECORDS[0], "id": "long", "evaluation": "[[3]] " + "very " * 2100}
    empty = {**STAGE_RECORDS[0], "id": "empty", "evaluation": ""}
    out = {o["id"]: o for o in scorer.process([too_long, STAGE_RECORDS[2], empty])}
    assert "max_model_len" in out["long"][REJECT] and out["long"].get("ifd") is None
    assert "empty" in out["empty"][REJECT] and out["empty"].get("ifd") is None
    assert out["r2"][REJECT] is None and math.isfinite(out["r2"]["ifd"])


def test_prefix_groups_need_a_long_enough_common_prefix():
    scorer = SharedPrefixScorer(engine=None, min_prefix=3)
    items = [(0, [1, 2, 3, 4, 9], [5]), (1, [7, 7, 7, 7], [5]), (2, [1, 2, 3, 5], [5]), (3, [1, 2, 8], [5])]
    groups = [[i for i, _, _ in g] for g in scorer._groups(items)]
    assert groups == [[0, 2], [3], [1]]
    # a deep prefix shared by two beats a shallow one shared by three
    deep = [(0, [1, 1, 1, 1, 1, 5], [5]), (1, [1, 1, 1, 1, 1, 6], [5]), (2, [1, 1, 2, 9], [5])]
    assert [[i for i, _, _ in g] for g in SharedPrefixScorer(None, min_prefix=2)._groups(deep)] == [[0, 1], [2]]
    # ...but not when the deeper prefix is only a little longer: 3 x 2 saved together, 1 x 3 + 1 x 2 apart
    close = [(0, [1, 1, 1, 5], [5]), (1, [1, 1, 1, 6], [5]), (2, [1, 1, 2, 9], [5]), (3, [1, 1, 3, 9], [5])]
    assert len(SharedPrefixScorer(None, min_prefix=2)._groups(close)) == 1
    assert _common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2]]) == [1, 2]


@pytest.mark.integration  # starts Ray
def test_sorted_windows_keep_every_row_and_sort_each_window(ray_local):
    import random

    rng = random.Random(0)
    rows = [{"id": i, "scenario": rng.choice(["a", "b", "c"]), "mode": rng.choice(["single", "pairwise"])}
            for i in range(300)]
    out = ifd_stage.sort_windows(ray_local.data.from_items(rows, override_num_blocks=3), 50)
    got = [r for b in out.iter_batches(batch_size=None, batch_format="pyarrow") for r in b.to_pylist()]
    assert sorted(r["id"] for r in got) == list(range(300))  # nothing lost, nothing twice
    keys = [(r["scenario"], r["mode"]) for r in got]
    descents = sum(1 for x, y in zip(keys, keys[1:]) if y < x)
    assert descents <= 300 // 50 + 3  # sorted runs: a new one starts only where a window (or block) does
    # ...and it groups: far fewer scenario/mode changes than in the input order
    changes = sum(1 for x, y in zip(got, got[1:]) if (x["scenario"], x["mode"]) != (y["scenario"], y["mode"]))
    assert changes < 300 / 3
