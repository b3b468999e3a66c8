"""The prefer stage: DPO's loss and log-probabilities by hand, pair mining's accounting on a hand-built
table, the stored reference against a direct forward pass of the embedded model, and the stage end
to end on a real local cluster (mine, pair, reference, optimise), killed with its driver mid-optimisation
and run again to the planned step count."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from themis_ray import judging
from themis_ray.config import EngineConfig, load
from themis_ray.schema import REJECT, REJECT_CODE, output_schema
from themis_ray.stages.prefer import ReferenceScorer, pair_candidates, pair_stats, validate
from themis_ray.stages.registry import selected
from themis_ray.train.collate import IGNORE_INDEX
from themis_ray.train.losses import answer_logprobs, preference_loss


# --- the loss --------------------------------------------------------------------------------------


def test_dpo_loss_matches_a_hand_computed_value():
    import torch

    # pi_c - ref_c = 1, pi_r - ref_r = -1: margin = beta * 2 = 0.2 -> loss = log(1 + e^-0.2)
    # second pair: ratios 0 and 0.5: margin = -0.05 -> loss = log(1 + e^0.05)
    loss, parts = preference_loss(torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -7.5]),
                                  torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -8.0]), beta=0.1)
    expected = [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.05))]
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert parts["dpo_sum"] == pytest.approx(sum(expected), abs=1e-6)
    assert parts["chosen_sum"] == pytest.approx(1.0) and parts["rejected_sum"] == pytest.approx(-0.5)
    assert parts["margin_sum"] == pytest.approx(0.15) and parts["correct"] == 1 and parts["pairs"] == 2


def test_dpo_loss_pulls_chosen_up_and_rejected_down():
    import torch

    chosen, rejected = torch.tensor([-3.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    loss, _ = preference_loss(chosen, rejected, torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(2))  # policy = reference: -log sigmoid(0)
    loss.backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises chosen, lowers rejected


def test_answer_logprobs_sum_the_answer_without_its_end_of_turn():
    import torch

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1, 4, IGNORE_INDEX],  # answer 3, 1 + end 4
                           [IGNORE_INDEX, 2, 2, 0, 1, 4]])  # answer 2, 2, 0, 1 + end 4
    logp = torch.log_softmax(logits, dim=-1)
    want = [logp[0, 1, 3] + logp[0, 2, 1], logp[1, 0, 2] + logp[1, 1, 2] + logp[1, 2, 0] + logp[1, 3, 1]]
    assert answer_logprobs(logits, labels).tolist() == pytest.approx([w.item() for w in want], abs=1e-5)


def test_the_preference_objective_starts_at_log_2_with_zero_log_ratios(tiny_model_dir):
    """The loop's DPO objective on a batch of two pairs whose references are the policy's own
    log-probabilities: ratios 0, loss log 2, and the SFT term is the chosen answers' cross-entropy."""
    import torch
    from transformers import AutoModelForCausalLM

    from themis_ray.train.collate import collate_rows
    from themis_ray.train.data import _tokenizer, tokenise_pairs
    from themis_ray.train.losses import judge_loss
    from themis_ray.train.objectives import PreferenceObjective

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    pairs = [{"id": f"x{i}", "prompt": f"Rate answer {i}.", "chosen": f"[[{i + 3}]] Good.",
              "rejected": "no score here", "ref_chosen": 0.0, "ref_rejected": 0.0,
              "chosen_tokens": 0, "rejected_tokens": 0} for i in range(2)]
    tokenizer = _tokenizer(tiny_model_dir)
    for p in pairs:  # the token counts the reference scorer would report
        p["chosen_tokens"] = len(tokenizer(p["chosen"], add_special_tokens=False)["input_ids"])
        p["rejected_tokens"] = len(tokenizer(p["rejected"], add_special_tokens=False)["input_ids"])
    rows = tokenise_pairs(pa.Table.from_pylist(pairs), tiny_model_dir, max_length=256).to_pylist()
    assert all(r[REJECT] is None for r in rows)
    with torch.no_grad():
        for r in rows:
            for side in ("chosen", "rejected"):
                ids, labels = torch.tensor([r[f"{side}_input_ids"]]), torch.tensor([r[f"{side}_labels"]])
                r[f"ref_{side}"] = answer_logprobs(model(input_ids=ids).logits, labels).item()
        objective = PreferenceObjective({"beta": 0.1, "sft_weight": 0.5})
        loss, sums = objective.micro_batch(model, rows, tokenizer.pad_token_id)
        figures = objective.metrics(sums)
        chosen = collate_rows([{"input_ids": r["chosen_input_ids"], "labels": r["chosen_labels"],
                                "kinds": [0] * len(r["chosen_input_ids"]), "segments": [len(r["chosen_input_ids"])]}
                               for r in rows], tokenizer.pad_token_id)
        ce = judge_loss(model(input_ids=chosen["input_ids"], attention_mask=chosen["attention_mask"]).logits,
                        chosen["labels"], chosen["kinds"])[0].item()
    assert figures["chosen_logratio"] == pytest.approx(0.0, abs=1e-3)
    assert figures["rejected_logratio"] == pytest.approx(0.0, abs=1e-3)
    assert figures["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3) and figures["pairs"] == 2
    assert figures["sft_loss"] == pytest.approx(ce, rel=1e-4)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * ce, abs=1e-3)
    assert sums[-2] == sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)


# --- mining and pairing -----------------------------------------------------------------------------


def _mined(i: int, mode: str = "single", **kw) -> dict:
    row = {"id": f"m{i}", "mode": mode, "scenario": "open_qa", "prompt": f"prompt {i}",
           "prompt_swapped": f"prompt {i} swapped" if mode == "pairwise" else None,
           "evaluation": "[[4]] Fine.", "evaluation_swapped": None, "score": 4.0, "verdict": None,
           "judge_output": "[[4]] Fine too.", "judge_output_swapped": None, "judge_error": None}
    if mode == "pairwise":
        row.update(evaluation="[[A]] A is better.", evaluation_swapped="[[B]] B is better.", verdict="A", score=None,
                   judge_output="[[A]] A.", judge_output_swapped="[[B]] B.")
    return {**row, **kw}


MINED = [
    _mined(0),  # right: 4 vs 4
    _mined(1, judge_output="[[3]] Close."),  # off by 1 < gap 2: right enough
    _mined(2, judge_output="[[1]] Bad."),  # off by 3: score_gap
    _mined(3, judge_output="I think it is good."),  # no [[n]]: unparsed
    _mined(4, judge_error="engine error: boom"),  # no pair: engine_error
    _mined(5, "pairwise"),  # right in both orders: two no-pair candidates
    _mined(6, "pairwise", judge_output="[[A]] A.", judge_output_swapped="[[A]] A."),  # flips: swapped wrong
    _mined(7, "pairwise", judge_output="[[B]] B.", judge_output_swapped="[[A]] A."),  # consistent but wrong
    _mined(8, "pairwise", judge_output="[[C]]", judge_output_swapped="no verdict"),  # tie (wrong), unparsed
    _mined(9, "pairwise", evaluation_swapped="[[A]] A again."),  # the teacher contradicts itself swapped
]


def test_pair_mining_counts_every_candidate_as_a_pair_or_a_no_pair_reason():
    rows = [c for row in MINED for c in pair_candidates(row, min_score_gap=2.0)]
    assert len(rows) == 5 + 2 * 5  # pointwise once, pairwise in both orders
    pairs = [r for r in rows if r[REJECT] is None]
    no_pair = [r for r in rows if r[REJECT] is not None]
    table = pa.Table.from_pylist(rows, schema=output_schema("prefer"))
    accepted = pair_stats(table.filter(pa.compute.is_null(table[REJECT])), False)["pairs_by_mistake"]
    refused = pair_stats(table.filter(pa.compute.is_valid(table[REJECT])), True)["no_pair"]
    assert accepted == {"score_gap": 1, "unparsed": 2, "position_flip": 1, "wrong_verdict": 3}
    assert refused == {"judged_right": 6, "engine_error": 1, "teacher_inconsistent": 1}
    assert len(rows) == sum(accepted.values()) + sum(refused.values())  # rows in = pairs + no-pair
    by_key = {(r["record_id"], r["order"]): r for r in pairs}
    flip = by_key[("m6", "swapped")]  # [[A]] in the swapped order means B in the original: a flip
    assert flip["mistake"] == "position_flip" and flip["teacher_verdict"] == "B" and flip["judge_verdict"] == "A"
    assert flip["prompt"] == "prompt 6 swapped" and flip["chosen"] == "[[B]] B is better."
    assert flip["rejected"] == "[[A]] A."
    assert ("m6", "as given") not in by_key  # that order was right
    assert {o for (rid, o) in by_key if rid == "m7"} == {"as given", "swapped"}
    gap = by_key[("m2", None)]
    assert (gap["chosen"], gap["rejected"], gap["teacher_score"], gap["judge_score"]) == (
        "[[4]] Fine.", "[[1]] Bad.", 4.0, 1.0)
    assert len({r["id"] for r in rows}) == len(rows)  # one id per candidate
    inconsistent = [r for r in no_pair if r[REJECT_CODE] == "teacher_inconsistent"]
    assert [(r["record_id"], r["order"]) for r in inconsistent] == [("m9", "swapped")]


def test_prefer_config_is_validated_and_off_in_a_pipeline_by_default():
    cfg = load()
    assert "prefer" not in selected(cfg)
    assert selected(load(overrides=["prefer.enabled=true"])).index("prefer") == selected(cfg).index("train") + 1
    for bad, match in (("min_score_gap=0", "min_score_gap"), ("beta=-1", "beta"), ("pool_size=-1", "pool_size")):
        with pytest.raises(ValueError, match=match):
            validate(load(overrides=[f"prefer.{bad}"]).prefer)
    with pytest.raises(Exception, match="bogus"):
        load(overrides=["prefer.bogus=1"])


def test_the_paper_recipe_turns_preference_optimisation_on():
    root = Path(__file__).resolve().parents[1]
    cfg = load(root / "configs" / "themis-14b.yaml")
    assert cfg.prefer.enabled and "prefer" in selected(cfg)
    validate(cfg.prefer)


def test_the_memory_estimate_counts_both_sequences_of_a_pair():
    from themis_ray.stages.prefer import optimise_config
    from themis_ray.train.memory import ModelShape, check_fits, estimate_memory

    qwen_14b = ModelShape(params=14_167_000_000, largest_layer_params=152_064 * 5120, layers=48, hidden=5120,
                          intermediate=13_696, heads=40, kv_heads=40, vocab=152_064)
    cfg = load(Path(__file__).resolve().parents[1] / "configs" / "themis-14b.yaml")
    train_cfg = optimise_config(cfg)
    sft = estimate_memory(qwen_14b, cfg.train, world=16, ranks_per_node=8)
    dpo = estimate_memory(qwen_14b, train_cfg, world=16, ranks_per_node=8, sequences_per_row=2)
    assert dpo.model_states_per_rank == sft.model_states_per_rank
    assert dpo.activations_per_rank > sft.activations_per_rank and "preference pair" in dpo.table()
    check_fits(dpo, [], cfg.train.gpu_memory_gb)  # the paper recipe's DPO fits its 80 GB GPUs


# --- the reference, against a direct forward pass --------------------------------------------------


def _prompt(pairwise: bool = False) -> str:
    if pairwise:
        request = judging.JudgeRequest(instruction="Name a prime number.", scenario="open_qa", mode="pairwise",
                                       response_a="7 is prime.", response_b="Nine.")
    else:
        request = judging.JudgeRequest(instruction="Name a prime number.", scenario="open_qa", response="7 is prime.")
    return judging.render_prompt(request)


@pytest.mark.integration  # loads the real model
def test_reference_logprobs_equal_a_direct_forward_pass_over_the_training_tokens():
    import torch

    from themis_ray.assets import prepare_default_model
    from themis_ray.stages.prefer import MINED_SCHEMA
    from themis_ray.train.data import PAIR_SEQUENCE_SCHEMA, tokenise_pairs
    from themis_ray.train.recipe import load_base_model

    model_dir = str(prepare_default_model())
    scorer = ReferenceScorer(output_schema("prefer"), EngineConfig(), min_score_gap=1.0, max_length=4096)
    mined = {name: None for name in MINED_SCHEMA.names}
    mined.update(id="x", mode="single", scenario="open_qa", prompt=_prompt(), score=5.0,
                 evaluation="[[5]] The response names 7, which is prime.\nStrengths: correct [[5]]",
                 judge_output="[[2]] Wrong")
    (pair,) = scorer.process([mined])
    assert pair[REJECT] is None and pair["mistake"] == "score_gap"
    # The pair as the optimise step tokenises it, and the policy's log-probabilities at step 0.
    table = tokenise_pairs(pa.Table.from_pylist([pair]), model_dir, max_length=4096)
    assert table.schema == PAIR_SEQUENCE_SCHEMA
    (row,) = table.to_pylist()
    assert row[REJECT] is None  # the same answer tokens the reference scored
    model = load_base_model(model_dir).eval()
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            ids, labels = torch.tensor([row[f"{side}_input_ids"]]), torch.tensor([row[f"{side}_labels"]])
            direct = answer_logprobs(model(input_ids=ids).logits, labels).item()
            assert row[f"ref_{side}"] == pytest.approx(direct, abs=2e-3), side
    assert pair["ref_chosen"] < 0 and pair["ref_rejected"] < 0
    # Too long for train.max_length: no pair, with its reason.
    short = ReferenceScorer(output_schema("prefer"), EngineConfig(), min_score_gap=1.0, max_length=50)
    (refused,) = short.process([mined])
    assert refused[REJECT_CODE] == "too_long" and "train.max_length 50" in refused[REJECT]


# --- the stage on a real cluster -------------------------------------------------------------------


def _curated() -> list[dict]:
    """Curated records as the curate stage writes them: train-split originals (pointwise p0-p3, pairwise
    a0-a1), a validation record and an augmented copy that must never be mined (their ids sort first)."""
    rows = []
    answers = ["7 is prime.", "Nine.", "2, the only even prime.", "I do not know."]
    for i, (answer, score) in enumerate(zip(answers, (5.0, 1.0, 5.0, 1.0))):
        request = judging.JudgeRequest(instruction=f"Name a prime number ({i}).", scenario="open_qa", response=answer)
        rows.append({"id": f"p{i}", "mode": "single", "scenario": "open_qa", "instruction": request.instruction,
                     "response": answer, "response_a": None, "response_b": None, "reference": None,
                     "prompt": judging.render_prompt(request), "score": score, "verdict": None,
                     "evaluation": f"[[{score:g}]] The answer is {'right' if score > 3 else 'wrong'}.",
                     "evaluation_swapped": None, "split": "train", "augmentation_kind": None})
    for i, (a, b, verdict) in enumerate((("7 is prime.", "Nine.", "A"), ("Four.", "Eleven is prime.", "B"))):
        request = judging.JudgeRequest(instruction=f"Name a prime ({i}).", scenario="open_qa", mode="pairwise",
                                       response_a=a, response_b=b)
        other = {"A": "B", "B": "A"}[verdict]
        rows.append({"id": f"a{i}", "mode": "pairwise", "scenario": "open_qa", "instruction": request.instruction,
                     "response": None, "response_a": a, "response_b": b, "reference": None,
                     "prompt": judging.render_prompt(request), "score": None, "verdict": verdict,
                     "evaluation": f"[[{verdict}]] Response {verdict} names a prime.",
                     "evaluation_swapped": f"[[{other}]] Response {other} names a prime.",
                     "split": "train", "augmentation_kind": None})
    rows.append({**rows[0], "id": "0-validation", "split": "validation"})
    rows.append({**rows[1], "id": "0-copy", "augmentation_kind": "paraphrase"})
    return rows


@pytest.mark.integration
@pytest.mark.timeout(1500)  # two stage runs with a ZeRO-3 start each, on two shared cores
def test_prefer_stage_mines_pairs_and_resumes_after_its_driver_is_killed(tmp_path):
    """`themis-ray prefer` with the embedded model as the SFT judge: the driver is SIGKILLed after the
    step-1 checkpoint of the optimisation, the same command runs again and ends at the planned step
    count; every candidate is a pair or a no-pair reason, and the DPO judge is exported."""
    sys.path.insert(0, str(Path(__file__).parent))
    from local_ray import LocalRayHead, kill_at_checkpoint_then_rerun
    from stage_io import finished_stage

    from themis_ray.store import StageStore

    run_dir = tmp_path / "run"
    finished_stage(run_dir, "curate", pa.Table.from_pylist(_curated()))
    finished_stage(run_dir, "train", pa.table({"id": ["p0"], "tokens": [1]}))  # the SFT judge is prefer.model
    config = tmp_path / "prefer.yaml"
    with LocalRayHead(num_cpus=2) as head:
        config.write_text(json.dumps({
            "run_dir": str(run_dir), "ray": {"address": head.address},
            "train": {"num_workers": 2, "global_batch_size": 2, "micro_batch_size": 1, "max_length": 1024,
                      "checkpoint_every": 1},
            "prefer": {"model": "smollm2-135m-instruct", "pool_size": 3, "min_score_gap": 1.0, "epochs": 2,
                       "learning_rate": 1e-5, "sft_weight": 0.5, "sampling": {"max_tokens": 16},
                       "engine": {"num_threads": 2}, "pool": {"batch_size": 16}},
        }))
        command = [sys.executable, "-m", "themis_ray.cli", "prefer", "--config", str(config)]
        second = kill_at_checkpoint_then_rerun(command, run_dir, "prefer", tmp_path, step=1)
    assert "resuming" in second.stdout

    store = StageStore(str(run_dir), "prefer")
    manifest = store.manifest()
    # The pool: the first 3 train originals by id (a0, a1, p0); the validation record and the copy,
    # whose ids sort first, stay out.
    assert manifest["pool"] == {"pointwise": 1, "pairwise": 2}
    assert manifest["rows_in"] == manifest["candidates"] == 1 + 2 * 2
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_rejected"]
    assert manifest["pairs"] == manifest["rows_out"] == sum(manifest["pairs_by_mistake"].values()) >= 2
    assert manifest["rows_rejected"] == sum(manifest["no_pair"].values())
    pairs = store.read().to_pylist()
    assert {p["record_id"] for p in pairs} <= {"a0", "a1", "p0"}
    assert all(p["ref_chosen"] < 0 and p["ref_rejected"] < 0 and p["chosen_tokens"] > 0 for p in pairs)
    summary = manifest["optimise"]
    assert manifest["optimised"] and summary["resumed_from_step"] == 1
    assert summary["optimizer_steps"] == summary["steps"] == math.ceil(2 * manifest["pairs"] / 2)
    steps = [json.loads(line) for line in (run_dir / "prefer" / "prefer_metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, summary["steps"] + 1))
    for s in steps:
        for key in ("loss", "dpo_loss", "chosen_logratio", "rejected_logratio", "reward_margin", "sft_loss"):
            assert math.isfinite(s[key]), (key, s)
        assert 0 <= s["reward_accuracy"] <= 1 and s["pairs"] == 2
    # Step 1 starts at the reference: the policy is the SFT judge, so both log-ratios are ~0.
    assert abs(steps[0]["chosen_logratio"]) < 0.05 and abs(steps[0]["rejected_logratio"]) < 0.05
    assert (run_dir / "prefer" / "prefer_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "prefer" / "judge" / "config.json").is_file()


@pytest.mark.integration
def test_prefer_stage_with_no_mistake_to_learn_from_keeps_the_sft_judge(tmp_path):
    """A pool whose every candidate gives no pair (the teacher left no evaluation to prefer): the stage
    ends after pairing, counts every candidate by reason, trains nothing, and evaluate grades no
    "preferred" judge."""
    sys.path.insert(0, str(Path(__file__).parent))
    from local_ray import LocalRayHead, base_env
    from stage_io import finished_stage

    from themis_ray.evaluate.judges import resolve_judges
    from themis_ray.store import StageStore

    run_dir = tmp_path / "run"
    rows = [{**r, "evaluation": None, "evaluation_swapped": None} for r in _curated()]
    finished_stage(run_dir, "curate", pa.Table.from_pylist(rows))
    finished_stage(run_dir, "train", pa.table({"id": ["p0"], "tokens": [1]}))
    config = tmp_path / "prefer.yaml"
    with LocalRayHead(num_cpus=2) as head:
        config.write_text(json.dumps({
            "run_dir": str(run_dir), "ray": {"address": head.address},
            "prefer": {"model": "smollm2-135m-instruct", "pool_size": 3, "sampling": {"max_tokens": 8},
                       "engine": {"num_threads": 2}, "pool": {"batch_size": 16}},
        }))
        done = subprocess.run([sys.executable, "-m", "themis_ray.cli", "prefer", "--config", str(config)],
                              env=base_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no preference pairs among 5 candidates" in done.stdout
    manifest = StageStore(str(run_dir), "prefer").manifest()
    assert manifest["optimised"] is False and manifest["pairs"] == manifest["rows_out"] == 0
    assert manifest["rows_in"] == manifest["rows_rejected"] == 5
    assert manifest["no_pair"] == {"teacher_inconsistent": 5}
    assert not (run_dir / "prefer" / "judge").exists()
    cfg = load(None, [f"run_dir={run_dir}", "prefer.enabled=true"])
    assert "preferred" not in [j.name for j in resolve_judges(cfg)]
