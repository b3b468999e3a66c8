"""The judge's fine-tuning recipe: masking, rejects, packing, step arithmetic and memory estimates fast;
real Ray + Ray Data + DeepSpeed ZeRO-3 runs on a tiny random-initialised model (the mechanism is the
point here; tests/test_learning.py trains the embedded model): the train stage killed with its driver
and run again, and a worker killed mid-run."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from themis_ray import assets
from themis_ray.config import TrainConfig
from themis_ray.train.collate import (
    IGNORE_INDEX, SFT, SIM, collate, collate_rows, collate_sequences, encode, encode_records, format_spans, pack,
    sequence_row,
)
from themis_ray.train.data import SEQUENCE_SCHEMA, tokenise_batch
from themis_ray.train.losses import judge_loss
from themis_ray.train.memory import ModelShape, Node, check_fits, estimate_memory, model_shape
from themis_ray.train.recipe import (
    FAULT_ENV, deepspeed_config, load_base_model, plan_steps,
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
    assert rejects == [{"id": "r2", "tokens": n_long, "reason": f"too long: {n_long} tokens > max_length {limit}"}]


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


@pytest.mark.integration  # loads the real model
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


@pytest.mark.integration  # loads the real model
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


@pytest.mark.integration  # loads the real model
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


# --- tokenising and packing as Ray Data tasks run them --------------------------------------------


def test_tokenise_batch_filters_the_split_rejects_too_long_and_packs(tokenizer, model_dir):
    records = [_record(i, words=i % 4) for i in range(6)] + [_record(99, words=400)]
    table = pa.Table.from_pylist([{**r, "split": "validation" if r["id"] == "r5" else "train"} for r in records])
    longest = max(len(encode(r, tokenizer).input_ids) for r in records[:5])
    out = tokenise_batch(table, model_dir, max_length=2 * longest, packing=True)
    assert out.schema == SEQUENCE_SCHEMA
    rows = out.to_pylist()
    rejects = [r for r in rows if r["reject_reason"]]
    sequences = [r for r in rows if not r["reject_reason"]]
    n99 = len(encode(records[-1], tokenizer).input_ids)
    assert [(r["ids"], r["reject_reason"]) for r in rejects] == [
        (["r99"], f"too long: {n99} tokens > max_length {2 * longest}")]
    assert sorted(i for r in sequences for i in r["ids"]) == ["r0", "r1", "r2", "r3", "r4"]  # r5: validation
    assert len(sequences) < 5  # packed
    for row in sequences:  # flat tokens, one segment per record, nothing over the length
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["kinds"]) == sum(row["segments"]) == row["tokens"]
        assert row["tokens"] <= 2 * longest
    unpacked = tokenise_batch(table, model_dir, max_length=2 * longest, packing=False).to_pylist()
    assert all(len(r["ids"]) == 1 for r in unpacked)
    first = next(r for r in unpacked if r["ids"] == ["r0"])
    assert first["input_ids"] == encode(records[0], tokenizer).input_ids


def test_collate_rows_matches_collate_sequences(tokenizer):
    examples, _ = encode_records([_record(i, words=i) for i in range(3)], tokenizer, 1024)
    groups = [examples[:2], examples[2:]]
    a = collate_sequences(groups, tokenizer.pad_token_id)
    b = collate_rows([sequence_row(g) for g in groups], tokenizer.pad_token_id)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all() if hasattr(a[key], "shape") else a[key] == b[key]


# --- step arithmetic ----------------------------------------------------------------------------


@pytest.mark.parametrize("workers,accum", [(1, 4), (2, 2)])
def test_grad_accumulation_reaches_the_global_batch(workers, accum):
    cfg = TrainConfig(num_workers=workers, global_batch_size=4, micro_batch_size=1, epochs=2, warmup_ratio=0.1)
    plan = plan_steps(10, cfg)
    assert plan.grad_accum == accum
    assert plan.global_batch == 4
    assert plan.total_steps == math.ceil(2 * 10 / 4)  # epochs over the sequences, in whole global batches
    assert plan.micro_batches_per_rank == plan.total_steps * accum
    assert plan.rows_per_rank * workers == plan.rows_total == plan.total_steps * 4 >= 2 * 10
    assert plan.warmup_steps == 1


def test_plan_tops_up_the_last_global_batch_and_never_accumulates_below_one():
    plan = plan_steps(7, TrainConfig(num_workers=2, global_batch_size=2, micro_batch_size=4))
    assert plan.grad_accum == 1 and plan.global_batch == 8 and plan.total_steps == 1
    assert plan.rows_per_rank == 4 and plan.rows_total - 7 == 1  # one sequence repeated
    with pytest.raises(ValueError, match="no training sequences"):
        plan_steps(0, TrainConfig(num_workers=2))


def test_deepspeed_config_is_filled_from_train_config():
    cfg = TrainConfig(num_workers=2, global_batch_size=8, micro_batch_size=2)
    ds = deepspeed_config(cfg, plan_steps(16, cfg))
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8
    assert ds["bf16"]["enabled"] is False
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert "offload_optimizer" not in ds["zero_optimization"] and "offload_param" not in ds["zero_optimization"]
    assert deepspeed_config(replace(cfg, use_gpu=True), plan_steps(16, cfg))["bf16"]["enabled"] is True
    opt = deepspeed_config(replace(cfg, offload="optimizer"), plan_steps(16, cfg))["zero_optimization"]
    assert opt["offload_optimizer"]["device"] == "cpu" and "offload_param" not in opt
    full = deepspeed_config(replace(cfg, offload="all", use_gpu=True), plan_steps(16, cfg))["zero_optimization"]
    assert full["offload_optimizer"] == full["offload_param"] == {"device": "cpu", "pin_memory": True}
    with pytest.raises(ValueError, match="train.offload"):
        deepspeed_config(replace(cfg, offload="disk"), plan_steps(16, cfg))


def _load_config(name: str, *overrides: str):
    from themis_ray.config import load

    return load(Path(__file__).resolve().parents[1] / "configs" / name, list(overrides))


def test_paper_recipe_config_loads_and_plans_the_paper_batch():
    cfg = _load_config("themis-14b.yaml", "train.model=/models/qwen-14b")
    train = cfg.train
    assert (train.num_workers, train.use_gpu, train.epochs, train.global_batch_size) == (16, True, 3, 128)
    assert train.learning_rate == 2.0e-5 and train.warmup_ratio == 0.1 and train.model == "/models/qwen-14b"
    assert train.activation_checkpointing and train.partitioned_load and train.max_failures > 0
    plan = plan_steps(14010, train)  # the paper's 14,010 SFT records, unpacked: one sequence each
    assert plan.global_batch == 128 and plan.grad_accum == 128 // (train.micro_batch_size * 16)
    assert plan.total_steps == math.ceil(3 * 14010 / 128) and plan.warmup_steps == math.ceil(0.1 * plan.total_steps)
    ds = deepspeed_config(train, plan)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == 128
    assert _load_config("themis-14b.yaml").train.model == "/path/to/qwen-14b"  # a placeholder the user replaces


def test_single_node_preset_plans_the_paper_batch_on_eight_gpus():
    train = _load_config("themis-14b-8gpu.yaml").train
    assert (train.num_workers, train.use_gpu, train.global_batch_size) == (8, True, 128)
    assert train.activation_checkpointing and train.partitioned_load and train.max_failures > 0
    plan = plan_steps(14010, train)
    assert plan.global_batch == 128 and plan.num_workers == 8


def test_the_cluster_config_restarts_training_after_failures():
    import yaml

    cluster = Path(__file__).resolve().parents[1] / "cluster" / "configs" / "pipeline.yaml"
    assert yaml.safe_load(cluster.read_text())["train"]["max_failures"] > 0


# --- memory estimate ------------------------------------------------------------------------------

QWEN_14B = ModelShape(params=14_167_000_000, largest_layer_params=152_064 * 5120, layers=48, hidden=5120,
                      intermediate=13_696, heads=40, kv_heads=40, vocab=152_064)


def test_memory_estimate_uses_deepspeed_for_gpu_model_states_and_shrinks_with_the_switches():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg = TrainConfig(num_workers=16, use_gpu=True, micro_batch_size=2, max_length=4096)
    est = estimate_memory(QWEN_14B, cfg, world=16, ranks_per_node=8)
    host, gpu, _ = estimate_zero3_model_states_mem_needs(QWEN_14B.params, QWEN_14B.largest_layer_params, 8, 2,
                                                         cpu_offload=False, cpu_offload_params=False, zero_init=True)
    assert est.model_states_per_rank == gpu and est.host_per_node == host and est.load_per_rank == 0
    ckpt = estimate_memory(QWEN_14B, replace(cfg, activation_checkpointing=True), world=16, ranks_per_node=8)
    assert ckpt.activations_per_rank < est.activations_per_rank / 5
    offload = estimate_memory(QWEN_14B, replace(cfg, offload="optimizer"), world=16, ranks_per_node=8)
    assert offload.model_states_per_rank < est.model_states_per_rank / 3 and offload.host_per_node > host
    full = estimate_memory(QWEN_14B, replace(cfg, partitioned_load=False), world=16, ranks_per_node=8)
    assert full.load_per_rank == 4 * QWEN_14B.params and full.host_per_node >= 8 * 4 * QWEN_14B.params
    assert "GB" in est.table()


def test_memory_check_refuses_what_the_cluster_cannot_hold():
    cfg = TrainConfig(num_workers=16, use_gpu=True, micro_batch_size=2, max_length=4096)
    est = estimate_memory(QWEN_14B, cfg, world=16, ranks_per_node=8)
    with pytest.raises(MemoryError, match="GPU memory.*train.gpu_memory_gb is 40.*activation_checkpointing"):
        check_fits(est, [Node(slots=8, memory=1e12)] * 2, gpu_memory_gb=40)
    fitting = estimate_memory(QWEN_14B, replace(cfg, activation_checkpointing=True), world=16, ranks_per_node=8)
    assert check_fits(fitting, [Node(slots=8, memory=1e12)] * 2, gpu_memory_gb=80) == ["gpu", "host"]
    # Not enough nodes yet (an autoscaling cluster): only the GPU figure is checked.
    assert check_fits(fitting, [Node(slots=8, memory=1e12)], gpu_memory_gb=80) == ["gpu"]
    # Training on CPU: the host holds everything.
    cpu = estimate_memory(QWEN_14B, TrainConfig(num_workers=2), world=2)
    with pytest.raises(MemoryError, match="host memory per rank"):
        check_fits(cpu, [Node(slots=2, memory=16e9)])


def test_model_shape_reads_the_config_only(model_dir):
    shape = model_shape(model_dir)  # SmolLM2-135M, built on the meta device
    assert 130e6 < shape.params < 140e6 and shape.layers == 30 and shape.hidden == 576
    assert shape.largest_layer_params == shape.vocab * shape.hidden  # the (tied) embedding


@pytest.mark.integration
def test_a_recipe_that_cannot_fit_fails_before_any_worker_starts(ray_local, tmp_path, capsys):
    """Qwen2.5-14B's shape (its config only: the estimate never reads weights) on the local 2-CPU Ray:
    the estimate is printed and the run refused, naming the memory each rank needs."""
    from transformers import Qwen2Config

    from themis_ray.train import train_judge

    Qwen2Config(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                num_attention_heads=40, num_key_value_heads=8,
                tie_word_embeddings=False).save_pretrained(tmp_path / "qwen-14b")
    with pytest.raises(MemoryError, match="GB of host memory per rank"):
        train_judge([_record(1), _record(2)], str(tmp_path / "qwen-14b"), tmp_path / "judge", TrainConfig())
    assert "train memory estimate: 14.7" in capsys.readouterr().out  # Qwen2.5-14B has 14.7B parameters
    assert not (tmp_path / "_work" / "ray_train").exists()  # no Ray Train run was started


def test_a_missing_base_model_folder_is_named(tmp_path):
    from themis_ray.train import train_judge

    with pytest.raises(FileNotFoundError, match="train.model.*/path/to/qwen-14b"):
        train_judge([_record(1)], "/path/to/qwen-14b", tmp_path / "judge", TrainConfig())


# --- real runs --------------------------------------------------------------------------------------


def _curate_store(run_dir: Path, records: list[dict]) -> None:
    """A finished curate stage holding `records` (id, prompt, evaluation, split)."""
    from themis_ray.store import StageResult, StageStore

    store = StageStore(str(run_dir), "curate")
    fingerprint = {"test": "curate"}
    store.begin(fingerprint)
    pq.write_table(pa.Table.from_pylist(records[: len(records) // 2]), store.file("part-a.parquet"))
    pq.write_table(pa.Table.from_pylist(records[len(records) // 2:]), store.file("part-b.parquet"))
    store.commit(StageResult(rows_in=len(records)), fingerprint, 0.0)


@pytest.mark.integration
def test_train_stage_resumes_after_its_driver_is_killed(tiny_model_dir, tmp_path):
    """`themis-ray train` on a real local cluster: the driver is SIGKILLed after the step-2 checkpoint,
    the same command runs again and continues from that checkpoint (not from step 0) to the planned
    step count. The stage's rows are the train-split records (id, tokens), the too-long one a reject."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from local_ray import LocalRayHead, kill_at_checkpoint_then_rerun

    from themis_ray.store import StageStore

    records = [{**_record(i, score=1 + i % 5, words=i % 5), "split": "train"} for i in range(10)]
    records += [{**_record(50 + i), "split": "validation"} for i in range(3)]
    records.append({**_record(99, words=400), "split": "train"})  # too long: a reject, not truncated
    run_dir = tmp_path / "run"
    _curate_store(run_dir, records)
    max_length = 160
    config = tmp_path / "train.yaml"
    with LocalRayHead(num_cpus=2) as head:
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "run_dir": str(run_dir), "ray": {"address": head.address},
            "train": {"model": tiny_model_dir, "num_workers": 2, "global_batch_size": 2, "micro_batch_size": 1,
                      "epochs": 2, "learning_rate": 1e-3, "warmup_ratio": 0.0, "max_length": max_length,
                      "packing": True, "sim_loss_weight": 0.5, "checkpoint_every": 2, "checkpoints_to_keep": 1},
        }))
        command = [sys.executable, "-m", "themis_ray.cli", "train", "--config", str(config)]
        second = kill_at_checkpoint_then_rerun(command, run_dir, "train", tmp_path, step=2)
    assert "resuming" in second.stdout

    store = StageStore(str(run_dir), "train")
    manifest = store.manifest()
    summary = manifest["train"]
    assert summary["resumed_from_step"] == 2  # continued from the checkpoint the killed run left
    assert summary["optimizer_steps"] == summary["steps"]  # ...to the planned step count
    sequences = summary["sequences"]
    assert summary["steps"] == math.ceil(2 * sequences / 2) and sequences < 10  # packed
    steps = [json.loads(line) for line in (run_dir / "train" / "train_metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, summary["steps"] + 1))  # each step logged once
    for s in steps:  # the loss split by objective: both kinds of token were trained on
        assert all(math.isfinite(s[k]) for k in ("loss", "sft_loss", "sim_loss", "lr", "tokens_per_s"))
        assert s["sft_tokens"] > 0 and s["sim_tokens"] > 0 and 0 < s["packing_efficiency"] <= 1
    assert (run_dir / "train" / "train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Rows: the 11 train-split records; each trained one once with its token count, r99 rejected.
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rows_rejected"]) == (11, 10, 1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    written = store.read().to_pylist()
    assert sorted(r["id"] for r in written) == sorted(f"r{i}" for i in range(10))
    by_id = {r["id"]: r for r in records}
    assert all(r["tokens"] == len(encode(by_id[r["id"]], tokenizer).input_ids) for r in written)
    (reject,) = store.read_rejects().to_pylist()
    assert reject["id"] == "r99" and reject["reject_reason"].startswith("too long:")
    assert reject["reject_reason"].endswith(f"> max_length {max_length}")

    judge_dir = run_dir / "train" / "judge"  # exported from shards no rank ever held whole
    judge, info = AutoModelForCausalLM.from_pretrained(judge_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert judge.lm_head.weight is judge.model.embed_tokens.weight  # still tied
    import torch

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any(not torch.equal(p, q) for p, q in zip(judge.parameters(), base.parameters()))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": records[0]["prompt"]}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    generated = judge.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.integration
def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    """Rank 1 exits hard after step 3; the group restarts from the step-2 checkpoint and the run
    ends with the planned number of optimizer steps, each logged once. With ZeRO-3 CPU offload of
    parameters and optimizer state and activation checkpointing on, so those paths save, restore
    and export too."""
    from transformers import AutoModelForCausalLM

    from themis_ray.train import train_judge

    records = [_record(i, score=1 + i % 5) for i in range(8)]
    cfg = TrainConfig(
        num_workers=2, global_batch_size=2, micro_batch_size=1, epochs=1, learning_rate=1e-4,
        warmup_ratio=0.0, max_length=256, checkpoint_every=2, max_failures=1, offload="all",
        activation_checkpointing=True,
    )
    planned = plan_steps(len(records), cfg).total_steps
    assert planned == 4
    marker = tmp_path / "rank1-crashed"
    monkeypatch.setenv(FAULT_ENV, f"1:3:{marker}")
    summary = train_judge(records, tiny_model_dir, tmp_path / "judge", cfg)

    assert marker.is_file()  # the worker did die once
    assert summary["resumed_from_step"] == 2  # ...and the restart began at the last checkpoint
    assert summary["optimizer_steps"] == summary["steps"] == planned  # as many as an unfailed run
    assert summary["records"] == summary["sequences"] == 8 and summary["rejected"] == 0
    steps = [json.loads(line) for line in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, planned + 1))
    judge, info = AutoModelForCausalLM.from_pretrained(tmp_path / "judge", output_loading_info=True)
    assert not any(info.values()), info
