"""Learning check: a short ZeRO-3 SFT on judge records, measured on records it has never seen.

The records and the scoring are `benchmarks/train_learning_check.py`'s (a teacher rule the model can
learn: answers score 5, hedged answers 4, refusals 1, off-topic replies 2). Held-out records share no
instruction, fact, response template or the training templates' cue words with the training records
(asserted), so the held-out figures measure generalisation; the training records are scored beside
them to tell it apart from memorisation. Baselines: the base model and the best constant predictor on
the training labels.

Two sizes (benchmarks/RESULTS.md has both runs' figures):
- the suite's check (default, about the old 12-step budget): 24 records, 12 optimizer steps at lr
  1e-4. The embedded 135M model learns the verdict format (100% parsable against the base model's
  0%) but not yet the rule: it gives every record the same score, held-out and training alike, no
  better than the best constant. The test asserts exactly that much.
- the generalisation check (`THEMIS_LEARNING_CHECK=full`): 48 records, 3 epochs, 36 steps at lr
  3e-4. On held-out responses worded otherwise than the training ones it measured MAE 1.00 and
  Agr(2,2) 0.53, against 1.50 and 0.13 for the best constant (and MAE 1.50 for the base model); the
  bars below are what that run clears. It takes about 13 minutes on the idle 2-core development
  machine.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_learning_check.py"
FULL = os.environ.get("THEMIS_LEARNING_CHECK") == "full"
# (training records, held-out records, training records scored, epochs, learning rate)
SIZE = (48, 16, 16, 3, 3e-4) if FULL else (24, 16, 8, 2, 1e-4)


def _learning_check():
    spec = importlib.util.spec_from_file_location("train_learning_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_held_out_records_share_nothing_with_the_training_records():
    check = _learning_check()
    train, heldout = check.make_records(48, "train", 1), check.make_records(16, "heldout", 1)
    check.assert_disjoint(train, heldout)
    with pytest.raises(AssertionError, match="share instructions"):
        check.assert_disjoint(train, heldout + train[:1])
    with pytest.raises(AssertionError, match="share templates"):
        check.assert_disjoint(train, heldout + [{**heldout[0], "template": train[0]["template"]}])
    # The training templates' cue words (per kind) appear in no held-out response.
    cues = {"sorry", "can't", "cannot", "won't", "unable", "think", "sure", "maybe", "possibly", "believe",
            "verify", "talk", "rather", "favourite", "thought", "answer is", "of course", "would be"}
    leaked = {c for r in heldout for c in cues if c in r["response"].lower()}
    assert not leaked, leaked
    assert {r["score"] for r in heldout} == {1, 2, 4, 5}  # every kind is held out too
    assert check.best_constant([5, 4, 1, 2]) == 3  # MAE 1.5: any of 2..4, the middle one
    assert check.best_constant([5, 5, 4, 1]) in (4, 5)


@pytest.mark.integration
def test_short_sft_on_held_out_records(ray_local, tmp_path):
    check = _learning_check()
    n_train, n_heldout, n_eval, epochs, learning_rate = SIZE
    train, heldout = check.make_records(n_train, "train", 1), check.make_records(n_heldout, "heldout", 1)
    result = check.run_check(train, heldout, train[:n_eval], check.check_config(epochs, learning_rate), tmp_path,
                             base_on_train=FULL)
    base, tuned, constant = result["base"]["heldout"], result["trained"]["heldout"], result["constant"]["heldout"]
    summary = result["train_summary"]
    print(result)
    assert summary["first_loss"] < 5  # the base weights were loaded (a random model starts near ln(49152) = 10.8)
    assert summary["final_loss"] < summary["first_loss"] / 3
    assert tuned["parse_rate"] >= 0.95 and tuned["parse_rate"] > base["parse_rate"], result
    if FULL:  # the rule carries over to records the model never saw
        assert tuned["mae"] < 0.8 * constant["mae"] and tuned["mae"] < 0.8 * base["mae"], result
        assert tuned["agr_2_2"] > constant["agr_2_2"] + 0.25, result
