"""The judge's fine-tuning recipe: masking, rejects and step arithmetic fast; one real Ray + ZeRO-3 run."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from itertools import islice

import pytest

from themis_ray import assets
from themis_ray.config import TrainConfig
from themis_ray.train.collate import (
    IGNORE_INDEX, SFT, SIM, collate, collate_sequences, encode, encode_records, format_spans, pack,
)
from themis_ray.train.losses import judge_loss
from themis_ray.train.recipe import (
    FAULT_ENV, deepspeed_config, load_base_model, micro_batches, plan_steps, shard_sequences,
)


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


def test_format_tokens_are_sft_and_explanation_tokens_are_sim(tokenizer):
    evaluation = "[[4]] Mostly right.\n- Accuracy [[5]]: the sum is correct.\n- Clarity: [[3]] terse."
    example = encode({"id": "k", "prompt": "Evaluate.", "evaluation": evaluation}, tokenizer)
    answer = [(t, k) for t, label, k in zip(example.input_ids, example.labels, example.kinds)
              if label != IGNORE_INDEX]
    sft = "".join(tokenizer.decode([t]) for t, k in answer if k == SFT)
    sim = "".join(tokenizer.decode([t]) for t, k in answer if k == SIM)
    for marker in ("[[4]]", "[[5]]", "[[3]]", "Accuracy", "Clarity", "<|im_end|>"):
        assert marker.replace(" ", "") in sft.replace(" ", ""), marker
    for prose in ("Mostly right", "the sum is correct", "terse"):
        assert prose in sim, prose
    assert "[[" not in sim and "Accuracy" not in sim
    # Prompt tokens carry no loss and no Sim label.
    assert all(k == SFT for k, label in zip(example.kinds, example.labels) if label == IGNORE_INDEX)


def test_format_spans_cover_markers_and_line_labels():
    text = "[[2]] Weak answer: it is wrong.\nStrengths: polite.\n1. Relevance [[1]]: off topic."
    spans = [text[a:b] for a, b in format_spans(text)]
    assert spans[0] == "[[2]]"
    assert "Strengths:" in spans and "1. Relevance [[1]]:" in spans
    assert not any("polite" in s or "off topic" in s for s in spans)


# --- packing ------------------------------------------------------------------------------------


def test_pack_fits_every_example_once_within_the_length(tokenizer):
    examples, _ = encode_records([_record(i, words=i % 7) for i in range(12)], tokenizer, 1024)
    longest = max(len(e.input_ids) for e in examples)
    bins = pack(examples, max_length=2 * longest)
    assert sorted(e.id for b in bins for e in b) == sorted(e.id for e in examples)
    assert all(sum(len(e.input_ids) for e in b) <= 2 * longest for b in bins)
    assert len(bins) < len(examples)  # two or more records share a sequence
    with pytest.raises(ValueError, match="exceed the packing length"):
        pack(examples, max_length=longest - 1)


def test_packed_batch_restarts_positions_and_keeps_labels(tokenizer):
    examples, _ = encode_records([_record(i, words=i) for i in range(3)], tokenizer, 1024)
    batch = collate_sequences([examples[:2], examples[2:]], tokenizer.pad_token_id)
    assert "attention_mask" not in batch  # packed: the block mask comes from the position ids
    n0, n1, n2 = (len(e.input_ids) for e in examples)
    assert batch["position_ids"][0, : n0 + n1].tolist() == list(range(n0)) + list(range(n1))
    assert batch["position_ids"][1, n2:].tolist() == list(range(n0 + n1 - n2))  # padding: its own block
    assert batch["labels"][0, : n0 + n1].tolist() == examples[0].labels + examples[1].labels
    assert (batch["labels"][1, n2:] == IGNORE_INDEX).all()
    assert batch["real_tokens"] == n0 + n1 + n2


def test_packed_records_do_not_see_each_other(tokenizer, model_dir):
    """Each record's logits and loss in a packed sequence equal those of the record run alone."""
    import torch

    model = load_base_model(model_dir).eval()
    records = [_record(i, score=1 + i, words=2 * i) for i in range(3)]
    examples, _ = encode_records(records, tokenizer, 1024)
    packed = collate_sequences([examples], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        start = 0
        for e in examples:
            n = len(e.input_ids)
            alone = collate([e], tokenizer.pad_token_id)
            alone_logits = model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits
            assert torch.allclose(logits[0, start : start + n], alone_logits[0], atol=1e-3), e.id
            packed_part = judge_loss(logits[:, start : start + n], packed["labels"][:, start : start + n],
                                     packed["kinds"][:, start : start + n])[0]
            alone_part = judge_loss(alone_logits, alone["labels"], alone["kinds"])[0]
            assert torch.isclose(packed_part, alone_part, atol=1e-4)
            start += n
        # The control: the same sequence without the restarts lets later records see earlier ones.
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits
        second = slice(len(examples[0].input_ids), len(examples[0].input_ids) + len(examples[1].input_ids))
        assert not torch.allclose(leaky[0, second], logits[0, second], atol=1e-3)


# --- the multi-objective loss -------------------------------------------------------------------


def test_sim_weight_zero_is_exactly_the_plain_sft_loss(tokenizer, model_dir):
    import torch

    model = load_base_model(model_dir).eval()
    examples, _ = encode_records([_record(1, words=1), _record(2, words=5)], tokenizer, 1024)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        table = model.get_input_embeddings().weight
        loss, parts = judge_loss(out.logits, batch["labels"], batch["kinds"], table, sim_weight=0.0)
        assert torch.allclose(loss, out.loss, rtol=1e-6, atol=1e-6)  # transformers' own loss
        answer_sim = (batch["kinds"][:, 1:] == SIM) & (batch["labels"][:, 1:] != IGNORE_INDEX)
        assert parts["ce_n"] == parts["sft_n"] + int(answer_sim.sum()) == parts["sft_n"] + parts["sim_n"]
        assert parts["sim_n"] > 0 and parts["sim_sum"] == 0.0  # Sim tokens counted, the term off
        # With the similarity term on, SFT tokens keep their cross-entropy and Sim tokens blend in
        # 1 - cos(expected embedding, target embedding), a value within [0, 2].
        full, parts_full = judge_loss(out.logits, batch["labels"], batch["kinds"], table, sim_weight=1.0)
        assert parts_full["sim_n"] > 0 and 0.0 <= parts_full["sim_sum"] / parts_full["sim_n"] <= 2.0
        expected = (parts_full["sft_sum"] + parts_full["sim_sum"]) / parts_full["ce_n"]
        assert math.isclose(full.item(), expected, rel_tol=1e-5)
        half, _ = judge_loss(out.logits, batch["labels"], batch["kinds"], table, sim_weight=0.5)
        assert math.isclose(half.item(), (loss.item() + full.item()) / 2, rel_tol=1e-5)


def test_sim_loss_gradient_reaches_the_logits(tokenizer, model_dir):
    import torch

    examples, _ = encode_records([_record(3, words=4)], tokenizer, 1024)
    batch = collate(examples, tokenizer.pad_token_id)
    vocab, hidden = 64, 8
    labels = batch["labels"] % vocab
    labels[batch["labels"] == IGNORE_INDEX] = IGNORE_INDEX
    logits = torch.randn(1, labels.shape[1], vocab, requires_grad=True)
    table = torch.randn(vocab, hidden)
    sft_only = batch["kinds"] * 0 + SFT
    loss, parts = judge_loss(logits, labels, sft_only, table, sim_weight=1.0)
    assert parts["sim_n"] == 0  # nothing labelled Sim: the weight changes nothing
    loss.backward()
    plain_grad = logits.grad.clone()
    logits.grad = None
    judge_loss(logits, labels, batch["kinds"], table, sim_weight=1.0)[0].backward()
    assert not torch.allclose(plain_grad, logits.grad)


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


def test_packed_shards_plan_by_the_longest_shard(tokenizer):
    examples, _ = encode_records([_record(i, words=i % 5) for i in range(11)], tokenizer, 1024)
    longest = max(len(e.input_ids) for e in examples)
    cfg = TrainConfig(num_workers=2, global_batch_size=2, micro_batch_size=1, epochs=2, packing=True)
    shards = shard_sequences(examples, 2, packing=True, max_length=2 * longest)
    assert sorted(e.id for shard in shards for seq in shard for e in seq) == sorted(e.id for e in examples)
    assert all(len(shard) >= 1 for shard in shards)
    plan = plan_steps(len(examples), cfg, longest_shard=max(len(s) for s in shards))
    assert plan.total_steps == 2 * max(len(s) for s in shards)  # one sequence per rank per step
    unpacked = shard_sequences(examples, 2, packing=False, max_length=2 * longest)
    assert [len(s) for s in unpacked] == [6, 5] and all(len(seq) == 1 for s in unpacked for seq in s)


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


def test_paper_recipe_config_loads_and_plans_the_paper_batch():
    from pathlib import Path

    from themis_ray.config import load

    path = Path(__file__).resolve().parents[1] / "configs" / "themis-14b.yaml"
    cfg = load(path, ["train.model=/models/qwen-14b"])
    train = cfg.train
    assert (train.num_workers, train.use_gpu, train.epochs, train.global_batch_size) == (16, True, 3, 128)
    assert train.learning_rate == 2.0e-5 and train.warmup_ratio == 0.1 and train.model == "/models/qwen-14b"
    plan = plan_steps(14010, train)  # the paper's 14,010 SFT records
    assert plan.global_batch == 128 and plan.grad_accum == 128 // (train.micro_batch_size * 16)
    assert plan.total_steps == 3 * math.ceil(14010 / 128) and plan.warmup_steps == math.ceil(0.1 * plan.total_steps)
    ds = deepspeed_config(train, plan)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == 128
    assert load(path).train.model == "/path/to/qwen-14b"  # a placeholder the user replaces


def test_a_missing_base_model_folder_is_named(tmp_path):
    from themis_ray.train import train_judge

    with pytest.raises(FileNotFoundError, match="train.model.*/path/to/qwen-14b"):
        train_judge([_record(1)], "/path/to/qwen-14b", tmp_path / "judge", TrainConfig())


# --- a real run ---------------------------------------------------------------------------------


@pytest.mark.integration
def test_train_judge_two_workers_exports_a_loadable_judge(ray_local, model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from themis_ray.train import train_judge

    records = [_record(i, score=1 + i % 5, words=i) for i in range(8)]
    records.append(_record(99, words=400))  # rejected, not truncated
    cfg = TrainConfig(
        num_workers=2, global_batch_size=2, micro_batch_size=1, epochs=1,
        learning_rate=1e-4, warmup_ratio=0.0, max_length=256, packing=True, sim_loss_weight=0.5,
    )
    out = tmp_path / "judge"
    summary = train_judge(records, model_dir, out, cfg)

    # Packed: the step count follows the packed shards, fewer steps than records per rank.
    examples, _ = encode_records(records, AutoTokenizer.from_pretrained(model_dir), cfg.max_length)
    shards = shard_sequences(examples, 2, packing=True, max_length=cfg.max_length)
    planned = plan_steps(len(examples), cfg, longest_shard=max(len(s) for s in shards)).total_steps
    assert summary["steps"] == summary["optimizer_steps"] == planned and planned < len(examples) // 2
    assert summary["records"] == 8 and summary["sequences"] < 8 and summary["resumed_from_step"] == 0
    assert [r["id"] for r in summary["rejected"]] == ["r99"]
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["final_loss"])
    assert summary["tokens_per_s"] > 0 and summary["judge_dir"] == str(out.resolve())
    assert 0.0 < summary["packing_efficiency"] <= 1.0
    steps = [json.loads(line) for line in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, planned + 1))
    for s in steps:  # the loss split by objective: both kinds of token were trained on
        assert all(math.isfinite(s[k]) for k in ("loss", "sft_loss", "sim_loss", "lr", "tokens_per_s"))
        assert s["sft_tokens"] > 0 and s["sim_tokens"] > 0 and 0 < s["packing_efficiency"] <= 1
    assert (tmp_path / "train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

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


@pytest.mark.integration
def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_local, model_dir, tmp_path, monkeypatch):
    """Rank 1 exits hard after step 3; the group restarts from the step-2 checkpoint and the run
    ends with the planned number of optimizer steps, each logged once."""
    from transformers import AutoModelForCausalLM

    from themis_ray.train import train_judge

    records = [_record(i, score=1 + i % 5) for i in range(8)]
    cfg = TrainConfig(
        num_workers=2, global_batch_size=2, micro_batch_size=1, epochs=1, learning_rate=1e-4,
        warmup_ratio=0.0, max_length=256, checkpoint_every=2, max_failures=1,
    )
    planned = plan_steps(len(records), cfg).total_steps
    assert planned == 4
    marker = tmp_path / "rank1-crashed"
    monkeypatch.setenv(FAULT_ENV, f"1:3:{marker}")
    summary = train_judge(records, model_dir, tmp_path / "judge", cfg)

    assert marker.is_file()  # the worker did die once
    assert summary["resumed_from_step"] == 2  # ...and the restart began at the last checkpoint
    assert summary["optimizer_steps"] == summary["steps"] == planned  # as many as an unfailed run
    steps = [json.loads(line) for line in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, planned + 1))
    judge, info = AutoModelForCausalLM.from_pretrained(tmp_path / "judge", output_loading_info=True)
    assert not any(info.values()), info
