"""The judge's fine-tuning recipe: masking, rejects and step arithmetic fast; one real Ray + ZeRO-3 run."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from itertools import islice

import pytest

from themis_ray import assets
from themis_ray.config import TrainConfig
from themis_ray.train.collate import IGNORE_INDEX, collate, encode, encode_records
from themis_ray.train.recipe import deepspeed_config, micro_batches, plan_steps


@pytest.fixture(scope="module")
def model_dir():
    return str(assets.prepare_default_model())


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _record(i: int, score: int = 4, words: int = 3) -> dict:
    return {
        "id": f"r{i}",
        "prompt": f"Evaluate the response to question {i}.\nQuestion: What is {i} + {i}?\nResponse: {2 * i}.",
        "evaluation": f"[[{score}]] The response is correct{' and concise' * words}.",
    }


# --- tokenization and masking -------------------------------------------------------------------


def test_mask_covers_exactly_the_answer_and_end_of_turn(tokenizer):
    record = _record(3)
    example = encode(record, tokenizer)
    assert len(example.input_ids) == len(example.labels)
    answer = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer) == record["evaluation"] + "<|im_end|>"
    # The unmasked span is one contiguous tail: the prompt is fully masked, the answer fully kept.
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in example.labels[:first])
    assert example.labels[first:] == example.input_ids[first:]
    # The prompt part is exactly the generation prompt the judge will be served with.
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": record["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(example.input_ids[:first]) == prompt


def test_too_long_records_are_rejected_not_truncated(tokenizer):
    short, long = _record(1, words=1), _record(2, words=200)
    n_long = len(encode(long, tokenizer).input_ids)
    limit = len(encode(short, tokenizer).input_ids) + 5
    examples, rejects = encode_records([short, long], tokenizer, max_length=limit)
    assert [e.id for e in examples] == ["r1"]
    assert rejects == [{"id": "r2", "reason": f"too long: {n_long} tokens > max_length {limit}"}]


def test_collate_pads_with_masked_labels(tokenizer):
    examples, _ = encode_records([_record(1, words=1), _record(2, words=6)], tokenizer, 1024)
    batch = collate(examples, tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() == short
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert batch["labels"][1].ne(IGNORE_INDEX).sum() > batch["labels"][0].ne(IGNORE_INDEX).sum()


# --- step arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize("workers,accum", [(1, 4), (2, 2)])
def test_grad_accumulation_reaches_the_global_batch(workers, accum):
    cfg = TrainConfig(num_workers=workers, global_batch_size=4, micro_batch_size=1, epochs=2, warmup_ratio=0.1)
    plan = plan_steps(10, cfg)
    assert plan.grad_accum == accum
    assert plan.global_batch == 4
    assert plan.total_steps == 2 * math.ceil(10 / 4)
    assert plan.micro_batches_per_rank == plan.total_steps * accum
    assert plan.warmup_steps == 1


def test_plan_never_accumulates_below_one_and_needs_a_record_per_rank():
    plan = plan_steps(8, TrainConfig(num_workers=2, global_batch_size=2, micro_batch_size=4))
    assert plan.grad_accum == 1 and plan.global_batch == 8 and plan.total_steps == 1
    with pytest.raises(ValueError, match="every rank"):
        plan_steps(1, TrainConfig(num_workers=2))


def test_micro_batches_cycle_the_shard_deterministically():
    shard = list(range(5))
    first = list(islice(micro_batches(shard, 2, seed=0, rank=0), 6))
    assert first == list(islice(micro_batches(shard, 2, seed=0, rank=0), 6))
    assert all(len(b) == 2 for b in first)
    assert sorted(sum(first, [])[:5]) == shard  # the first epoch visits every record once


def test_deepspeed_config_is_filled_from_train_config():
    cfg = TrainConfig(num_workers=2, global_batch_size=8, micro_batch_size=2)
    ds = deepspeed_config(cfg, plan_steps(16, cfg))
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8
    assert ds["bf16"]["enabled"] is False
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert deepspeed_config(replace(cfg, use_gpu=True), plan_steps(16, cfg))["bf16"]["enabled"] is True


# --- a real run ---------------------------------------------------------------------------------


@pytest.fixture
def ray_local(monkeypatch):
    import ray

    if "RAY_AUTH_MODE" not in os.environ:  # a local test cluster needs no auth token
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.mark.integration
def test_train_judge_two_workers_exports_a_loadable_judge(ray_local, model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from themis_ray.train import train_judge

    records = [_record(i, score=1 + i % 5) for i in range(8)]
    records.append(_record(99, words=400))  # rejected, not truncated
    cfg = TrainConfig(
        num_workers=2, global_batch_size=4, micro_batch_size=1, epochs=1,
        learning_rate=1e-4, warmup_ratio=0.0, max_length=256,
    )
    out = tmp_path / "judge"
    summary = train_judge(records, model_dir, out, cfg)

    assert summary["steps"] == 2 and summary["records"] == 8
    assert [r["id"] for r in summary["rejected"]] == ["r99"]
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["final_loss"])
    assert summary["tokens_per_s"] > 0 and summary["judge_dir"] == str(out.resolve())
    steps = [json.loads(line) for line in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["loss"]) for s in steps)

    judge, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert judge.lm_head.weight is judge.model.embed_tokens.weight  # still tied
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    changed = [
        name for (name, p), q in zip(judge.named_parameters(), base.parameters()) if not torch.equal(p, q)
    ]
    assert changed, "training did not change any weight"

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": records[0]["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    generated = judge.generate(**ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    assert tokenizer.decode(generated[0, ids["input_ids"].shape[1] :]).strip()
