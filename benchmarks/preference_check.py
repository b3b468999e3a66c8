"""Does DPO on the SFT judge's own mistakes make a better judge than the SFT judge it starts from, on
records that share nothing with training? The disjoint set-up of train_learning_check.py (its facts,
response templates and teacher rule, reused from there), plus pairwise records: two responses to one
instruction, the teacher preferring the higher-scored one.

1. SFT: the train recipe fine-tunes the embedded SmolLM2-135M-Instruct on the training records
   (pointwise, and pairwise in both orders, as curate's swap does; `--no-sft-pairwise` trains on the
   pointwise records only, leaving the pairs to DPO).
2. Prefer: the prefer stage itself, on a run folder whose curate output holds those training records:
   the SFT judge re-judges them (pairwise in both orders), its mistakes become pairs, the reference
   log-probabilities are scored and DPO runs in the ZeRO-3 loop.
3. Grading: the SFT and the DPO judge answer the held-out records greedily through the `hf` engine
   (pairwise in both orders); the teacher's labels are the gold.

Held-out records share no instruction and no fact (the source of an instruction) with the training
records: `overlap_with_training` counts the held-out records that do, and must be 0.

Figures per judge: `pairwise_agreement` (combined verdict, a flip counted as a tie, equal to the
teacher's), `position_consistency` (share of held-out pairs whose verdict survives the swap), `mae`
(pointwise; an unparsable answer counts as the midpoint 3), `score_entropy` (bits, over parsed
pointwise scores: 0 is a judge that gives one score to everything), `parse_rate` (share of pointwise answers
that carry a score) and `pairwise_parse_rate` (share of pairwise answers, each order counted, that carry a
verdict), and `verdict_shares` (how often each combined verdict was given: a judge that answers one verdict
to everything shows it here). `delta`: DPO minus SFT, the mean
and a 95% interval from a paired bootstrap over held-out records.

    python benchmarks/preference_check.py --train 48 --train-pairs 24 --heldout 16 --heldout-pairs 16 \\
        --out benchmarks/results/preference_check.json
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_learning_check as sft_check  # noqa: E402

from _endpoint import emit  # noqa: E402
from themis_ray import judging  # noqa: E402
from themis_ray.config import EngineConfig, SamplingConfig  # noqa: E402

METRICS = ("pairwise_agreement", "position_consistency", "mae", "score_entropy", "parse_rate", "pairwise_parse_rate")


def make_pairs(n: int, split: str, seed: int) -> list[dict]:
    """`n` pairwise records of one set ("train" or "heldout"): two responses of kinds with different
    teacher scores to one of the set's questions, from the set's own templates and fillers; the
    teacher prefers the higher score. Response A is the better one in about half of them."""
    rng = random.Random(f"pairs:{split}:{seed}")
    facts = sft_check.FACTS[:sft_check.TRAIN_FACTS] if split == "train" else sft_check.FACTS[sft_check.TRAIN_FACTS:]
    kinds = list(sft_check.KINDS)
    pairs = []
    for k in range(n):
        question, answer = facts[rng.randrange(len(facts))]
        first, second = rng.sample(kinds, 2)
        responses = []
        for kind in (first, second):
            fill = {"a": answer, "r": rng.choice(sft_check.FILLERS[split]["r"]),
                    "t": rng.choice(sft_check.FILLERS[split]["t"])}
            responses.append((sft_check.KINDS[kind][0], rng.choice(sft_check.TEMPLATES[split][kind]).format(**fill)))
        (score_a, a), (score_b, b) = responses
        verdict = "A" if score_a > score_b else "B"
        request = judging.JudgeRequest(instruction=question, scenario="close_qa", mode="pairwise",
                                       response_a=a, response_b=b)
        other = {"A": "B", "B": "A"}[verdict]
        pairs.append({"id": f"{split}-{seed}-pair-{k}", "instruction": question, "fact": answer,
                      "response_a": a, "response_b": b, "verdict": verdict,
                      "prompt": judging.render_prompt(request),
                      "prompt_swapped": judging.render_prompt(judging.swap_pair(request)),
                      "evaluation": f"[[{verdict}]] Response {verdict} is the better answer.",
                      "evaluation_swapped": f"[[{other}]] Response {other} is the better answer."})
    return pairs


def curated_rows(train: list[dict], pairs: list[dict]) -> list[dict]:
    """The training records as the curate stage writes them (train split, originals)."""
    rows = [{"id": r["id"], "mode": "single", "scenario": "close_qa", "instruction": r["instruction"],
             "response": r["response"], "response_a": None, "response_b": None, "reference": None,
             "prompt": r["prompt"], "evaluation": r["evaluation"], "evaluation_swapped": None,
             "score": float(r["score"]), "verdict": None, "split": "train", "augmentation_kind": None} for r in train]
    rows += [{"id": p["id"], "mode": "pairwise", "scenario": "close_qa", "instruction": p["instruction"],
              "response": None, "response_a": p["response_a"], "response_b": p["response_b"], "reference": None,
              "prompt": p["prompt"], "evaluation": p["evaluation"], "evaluation_swapped": p["evaluation_swapped"],
              "score": None, "verdict": p["verdict"], "split": "train", "augmentation_kind": None} for p in pairs]
    return rows


def sft_records(train: list[dict], pairs: list[dict], pairwise: bool = True) -> list[dict]:
    """What SFT trains on: pointwise records, and (unless `pairwise` is off) each pair in both orders."""
    if not pairwise:
        pairs = []
    return ([{"id": r["id"], "prompt": r["prompt"], "evaluation": r["evaluation"]} for r in train]
            + [{"id": p["id"], "prompt": p["prompt"], "evaluation": p["evaluation"]} for p in pairs]
            + [{"id": p["id"] + "-swapped", "prompt": p["prompt_swapped"], "evaluation": p["evaluation_swapped"]}
               for p in pairs])


def overlap(train: list[dict], train_pairs: list[dict], heldout: list[dict], heldout_pairs: list[dict]) -> int:
    """Held-out records sharing an instruction or a fact (source) with anything trained on."""
    seen = {r["instruction"] for r in train + train_pairs} | {r["fact"] for r in train + train_pairs}
    return sum(r["instruction"] in seen or r["fact"] in seen for r in heldout + heldout_pairs)


def judge(model_dir: str, heldout: list[dict], pairs: list[dict], max_tokens: int) -> dict:
    """Per held-out record: the parsed score; per held-out pair: both orders' verdicts."""
    from themis_ray.engines import build_engine

    engine = build_engine(EngineConfig(model=model_dir, num_threads=2))
    sampling = SamplingConfig(max_tokens=max_tokens, temperature=0.0)
    try:
        points = engine.generate([judging.build_messages(r["prompt"]) for r in heldout], sampling)
        orders = engine.generate([judging.build_messages(p[key]) for p in pairs
                                  for key in ("prompt", "prompt_swapped")], sampling)
    finally:
        engine.close()
    scores = [judging.parse_evaluation(c.text).score if not c.error else None for c in points]
    verdicts = [judging.parse_evaluation(c.text, "pairwise").verdict if not c.error else None for c in orders]
    combined = [judging.combine_pairwise(verdicts[2 * k], verdicts[2 * k + 1]) for k in range(len(pairs))]
    return {"scores": scores, "order_verdicts": verdicts, "verdicts": [v for v, _ in combined],
            "consistent": [ok for _, ok in combined]}


def grade(out: dict, heldout: list[dict], pairs: list[dict], points: np.ndarray, duels: np.ndarray) -> dict:
    """The four figures over the held-out records indexed by `points` (pointwise) and `duels` (pairs)."""
    from themis_ray.evaluate.metrics import score_spread

    scores = [out["scores"][i] for i in points]
    gold = [heldout[i]["score"] for i in points]
    mae = float(np.mean([abs((3.0 if s is None else s) - g) for s, g in zip(scores, gold)])) if len(gold) else None
    entropy = score_spread([s for s in scores if s is not None])["score_entropy"] if len(gold) else None
    agree = [out["verdicts"][k] == pairs[k]["verdict"] for k in duels]
    consistent = [out["consistent"][k] for k in duels]
    parsed_orders = [out["order_verdicts"][2 * k + o] is not None for k in duels for o in (0, 1)]
    return {"pairwise_agreement": float(np.mean(agree)) if agree else None,
            "position_consistency": float(np.mean(consistent)) if consistent else None,
            "mae": mae, "score_entropy": None if entropy is None or entropy != entropy else entropy,
            "parse_rate": float(np.mean([s is not None for s in scores])) if len(scores) else None,
            "pairwise_parse_rate": float(np.mean(parsed_orders)) if parsed_orders else None}


def verdict_shares(verdicts: list) -> dict:
    """Share of each combined verdict (None: unparsed), so a judge answering one verdict everywhere shows."""
    counts = Counter("unparsed" if v is None else v for v in verdicts)
    return {v: round(n / len(verdicts), 3) for v, n in sorted(counts.items())} if verdicts else {}


def bootstrap_delta(sft: dict, dpo: dict, heldout: list[dict], pairs: list[dict], samples: int, seed: int) -> dict:
    """DPO - SFT per figure: the mean over the held-out set and a paired bootstrap's 95% interval."""
    rng = np.random.default_rng(seed)
    points, duels = np.arange(len(heldout)), np.arange(len(pairs))
    full = {m: _diff(grade(dpo, heldout, pairs, points, duels)[m], grade(sft, heldout, pairs, points, duels)[m])
            for m in METRICS}
    draws: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(samples):
        p = rng.choice(points, size=len(points)) if len(points) else points
        d = rng.choice(duels, size=len(duels)) if len(duels) else duels
        a, b = grade(dpo, heldout, pairs, p, d), grade(sft, heldout, pairs, p, d)
        for m in METRICS:
            value = _diff(a[m], b[m])
            if value is not None:
                draws[m].append(value)
    return {m: {"mean": full[m], "ci95": [float(np.percentile(draws[m], 2.5)), float(np.percentile(draws[m], 97.5))]
                if draws[m] else None} for m in METRICS}


def finished_stage(run_dir: Path, name: str, table) -> None:
    """`table` as the finished output of stage `name` (the prefer stage's inputs)."""
    import pyarrow as pa

    from themis_ray.executor.sink import StageSink
    from themis_ray.schema import REJECT
    from themis_ray.store import StageResult, StageStore

    table = table.append_column(REJECT, pa.nulls(table.num_rows, pa.string()))
    store = StageStore(str(run_dir), name)
    store.begin({"benchmark": name}, force=True)
    StageSink(store.uri, table.schema).write([table], None)
    store.commit(StageResult(rows_in=table.num_rows), {"benchmark": name}, 0.0)


def _flag(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"


def _diff(a, b):
    return None if a is None or b is None else float(a) - float(b)


def run_check(args, work: Path) -> dict:
    import pyarrow as pa

    from themis_ray.assets import prepare_default_model
    from themis_ray.config import load
    from themis_ray.pipeline import run_stage
    from themis_ray.train import train_judge

    train = sft_check.make_records(args.train, "train", args.seed)
    heldout = sft_check.make_records(args.heldout, "heldout", args.seed)
    sft_check.assert_disjoint(train, heldout)
    train_pairs = make_pairs(args.train_pairs, "train", args.seed)
    heldout_pairs = make_pairs(args.heldout_pairs, "heldout", args.seed)
    shared = overlap(train, train_pairs, heldout, heldout_pairs)
    assert shared == 0, f"{shared} held-out records share an instruction or a fact with training"

    cfg = sft_check.check_config(args.epochs, args.learning_rate)
    model_dir = str(prepare_default_model())
    sft = train_judge(sft_records(train, train_pairs, args.sft_pairwise), model_dir, work / "sft" / "judge", cfg)

    run_dir = work / "run"
    finished_stage(run_dir, "curate", pa.Table.from_pylist(curated_rows(train, train_pairs)))
    finished_stage(run_dir, "train", pa.table({"id": ["sft"], "tokens": [0]}))
    prefer_cfg = load(overrides=[
        f"run_dir={run_dir}", f"prefer.model={sft['judge_dir']}", "prefer.pool_size=0",
        f"prefer.beta={args.beta}", f"prefer.sft_weight={args.sft_weight}", f"prefer.epochs={args.dpo_epochs}",
        f"prefer.learning_rate={args.dpo_learning_rate}", f"prefer.sampling.max_tokens={args.max_tokens}",
        "prefer.engine.num_threads=2", "prefer.checkpoint_every=0", "train.num_workers=2",
        "train.global_batch_size=4", "train.micro_batch_size=1", "train.max_length=1024",
    ])
    manifest = run_stage(prefer_cfg, "prefer", force=True)
    result = {"sft_train": {k: sft[k] for k in ("steps", "first_loss", "final_loss", "wall_s")},
              "prefer": {k: manifest.get(k) for k in ("pool", "candidates", "pairs", "pairs_by_mistake", "no_pair",
                                                      "optimised")}}
    if manifest.get("optimised"):
        result["prefer"]["optimise"] = {k: manifest["optimise"][k] for k in ("steps", "first_loss", "final_loss",
                                                                            "wall_s")}
    judges = {"sft": sft["judge_dir"]}
    if manifest.get("optimised"):
        judges["dpo"] = str(run_dir / "prefer" / "judge")
    outputs = {name: judge(path, heldout, heldout_pairs, args.max_tokens) for name, path in judges.items()}
    points, duels = np.arange(len(heldout)), np.arange(len(heldout_pairs))
    for name, out in outputs.items():
        result[name] = grade(out, heldout, heldout_pairs, points, duels)
        result[name]["verdict_shares"] = verdict_shares(out["verdicts"])
    if "dpo" in outputs:
        result["delta"] = bootstrap_delta(outputs["sft"], outputs["dpo"], heldout, heldout_pairs, args.bootstrap,
                                          args.seed)
    result.update(heldout_records=len(heldout), heldout_pairs=len(heldout_pairs), overlap_with_training=shared,
                  train_records=len(train), train_pairs=len(train_pairs))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--train-pairs", type=int, default=24)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--heldout-pairs", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2, help="SFT epochs")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="SFT learning rate")
    parser.add_argument("--sft-pairwise", action=argparse.BooleanOptionalAction, default=True,
                        help="SFT on the training pairs too; off, pairwise judging is learnt from DPO on its mistakes")
    parser.add_argument("--dpo-epochs", type=int, default=2)
    parser.add_argument("--dpo-learning-rate", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft-weight", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=12, help="per answer: the score or verdict opens it")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    started = time.time()
    ray.init(address="local", num_cpus=2)  # a Ray of its own, never another user's cluster
    try:
        with tempfile.TemporaryDirectory(prefix="themis-prefer-") as tmp:
            result = run_check(args, Path(tmp))
    finally:
        ray.shutdown()
    emit({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average": os.getloadavg(),
          "command": "python benchmarks/preference_check.py " + " ".join(
              _flag(k, v) for k, v in vars(args).items() if k != "out" and v is not None),
          **result, "wall_s": round(time.time() - started, 1)}, args.out)


if __name__ == "__main__":
    main()
