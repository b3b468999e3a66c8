"""Learning check: a short ZeRO-3 SFT on judge records teaches the embedded model to judge.

The records and the scoring are `benchmarks/train_learning_check.py`'s (a teacher rule the model can
learn: answers score 5 or 4, refusals 1, off-topic replies 2), so the test and the published figures
measure the same thing.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

from themis_ray.assets import prepare_default_model
from themis_ray.config import TrainConfig

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_learning_check.py"


def _learning_check():
    spec = importlib.util.spec_from_file_location("train_learning_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_sft_makes_verdicts_parsable_and_beats_the_majority_score(ray_local, tmp_path):
    from themis_ray.train import train_judge

    check = _learning_check()
    model_dir = str(prepare_default_model())
    train, heldout = check.make_records(24, seed=1), check.make_records(12, seed=2)
    gold = [r["score"] for r in heldout]
    base = check.figures(check.judge_outputs(model_dir, heldout), gold)

    cfg = TrainConfig(num_workers=2, epochs=2, global_batch_size=4, micro_batch_size=1, learning_rate=1e-4,
                      warmup_ratio=0.1, max_length=1024, checkpoint_every=0)
    summary = train_judge(train, model_dir, tmp_path / "judge", cfg)
    tuned = check.figures(check.judge_outputs(summary["judge_dir"], heldout), gold)

    majority = Counter(r["score"] for r in train).most_common(1)[0][0]
    majority_mae = sum(abs(majority - g) for g in gold) / len(gold)
    assert summary["final_loss"] < summary["first_loss"]
    assert tuned["parse_rate"] >= 0.95 and tuned["parse_rate"] > base["parse_rate"], (base, tuned)
    assert tuned["mae"] < majority_mae, (tuned, majority_mae)
