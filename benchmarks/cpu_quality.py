"""Is the laptop judge worth something? Run `configs/cpu-quality.yaml` end to end, then grade the trained
judge, its base and the teacher on the run's own validation split and on hand-labelled pairs.

The pairs (HUMAN_PAIRS) are written by hand for this benchmark and used for evaluation only: general
knowledge questions, nothing from the run's corpus (Python's docs), each with a right answer and a
wrong one (a false fact, an evasion, an off-topic or a truncated answer). In half of them the right
answer is the shorter, so "always prefer the longer answer" scores about one half. They are judged
in both orders (a flip counts as a tie), so position consistency is measured too.

Figures (raw JSON, `--out`): the pipeline's wall time and stage counts; `heldout_pairwise_accuracy` for
the judge, the base, the teacher, always-longer and random; `position_consistency` for judge and base;
`validation_mae` for judge, base and the best constant (the score minimising MAE on the TRAINING split,
applied to validation); `score_entropy` and `collapsed` for judge and base.

    bash setup.sh quality
    .venv/bin/python benchmarks/cpu_quality.py --out benchmarks/results/cpu_quality.json [key=value ...]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from _endpoint import emit

# (question, right answer, wrong answer); the right answer is the shorter in every other pair.
HUMAN_PAIRS = [
    ("What is the capital of Canada?", "Ottawa.",
     "The capital of Canada is Toronto, the largest city in the country and home of its parliament."),
    ("How many planets are in the solar system?",
     "There are eight planets: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.", "Twelve."),
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen.",
     "It was written by Charlotte Bronte in 1847, and it tells the story of a governess named Jane."),
    ("What is the boiling point of water at sea level in Fahrenheit?",
     "Water boils at 212 degrees Fahrenheit at sea level.", "Around 100."),
    ("What is the largest desert in Africa?", "The Sahara.",
     "That is a good question. Deserts are dry places that get very little rain, and many animals live there."),
    ("What does DNA stand for?", "DNA stands for deoxyribonucleic acid, the molecule that carries genetic "
     "information.", "Dynamic nucleic array."),
    ("In which year did the Second World War end?", "1945.",
     "The Second World War ended in 1939 when the Treaty of Versailles was signed by all the major powers."),
    ("What is the speed of light in a vacuum, roughly?",
     "About 300,000 kilometres per second (299,792 km/s exactly).", "It is about 300"),
    ("Which metal is liquid at room temperature?", "Mercury.",
     "Iron is liquid at room temperature, which is why it is used in thermometers to measure heat."),
    ("What is the main ingredient of guacamole?",
     "Avocado, mashed and usually mixed with lime juice, onion and salt.", "Tomatoes."),
    ("How many sides does a pentagon have?", "Five.",
     "I would rather not answer questions about shapes, but you can find this in any geometry book."),
    ("Who was the first person to walk on the Moon?",
     "Neil Armstrong, on 20 July 1969, during the Apollo 11 mission.", "Yuri Gagarin."),
    ("What is the chemical formula of table salt?", "NaCl.",
     "Table salt is a popular seasoning that people sprinkle on food; too much of it is bad for the heart."),
    ("What is the longest bone in the human body?",
     "The femur, the thigh bone, is the longest bone in the human body.", "The spine."),
    ("What currency is used in Japan?", "The yen.",
     "Japan uses the yuan, the same currency as China, since the two countries share a monetary union."),
    ("What is photosynthesis?", "The process by which plants use light, water and carbon dioxide to make "
     "glucose and release oxygen.", "When plants"),
]


def write_pairs(path: str) -> None:
    with open(path, "w") as f:
        for i, (question, right, wrong) in enumerate(HUMAN_PAIRS):
            a, b, winner = (right, wrong, "A") if i % 2 == 0 else (wrong, right, "B")
            f.write(json.dumps({"id": f"pair-{i}", "instruction": question, "response_a": a, "response_b": b,
                                "winner": winner}) + "\n")


def always_longer_accuracy() -> float:
    right_longer = [len(right) > len(wrong) for _, right, wrong in HUMAN_PAIRS]
    return float(np.mean(right_longer))


def split_scores(run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Teacher scores of the curated pointwise records: (train, validation), read part by part."""
    train, validation = [], []
    for path in sorted(glob.glob(os.path.join(run_dir, "curate", "*.parquet"))):
        t = pq.read_table(path, columns=["mode", "split", "score"]).to_pylist()
        for row in t:
            if row["mode"] != "pairwise" and row["score"] is not None:
                (train if row["split"] == "train" else validation).append(row["score"])
    return np.array(train, dtype=float), np.array(validation, dtype=float)


def best_constant(train: np.ndarray, low: int = 1, high: int = 5) -> int:
    costs = {c: float(np.abs(train - c).mean()) for c in range(low, high + 1)}
    return min(costs, key=lambda c: (costs[c], abs(c - (low + high) / 2)))


def themis(*args: str) -> float:
    start = time.time()
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "themis-ray"), *args], check=True)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cpu-quality.yaml")
    parser.add_argument("--teacher", default="qwen2.5-coder-1.5b-instruct", help="graded beside the judges")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="key=value, passed to every themis-ray command")
    args = parser.parse_args()
    from themis_ray.config import load

    cfg = load(args.config, args.overrides)
    run_dir = cfg.run_dir
    pipeline_s = themis("pipeline", "--config", args.config, *args.overrides)
    pairs = os.path.join(run_dir, "human_pairs.jsonl")
    write_pairs(pairs)
    evaluate_s = themis("evaluate", "--config", args.config, *args.overrides,
                        f"evaluate.judges=[trained,base,{args.teacher}]", "evaluate.benchmarks=[validation,file]",
                        f"evaluate.file.path={pairs}", "evaluate.file.format=pairwise")
    with open(os.path.join(run_dir, "evaluate", "metrics.json")) as f:
        metrics = json.load(f)

    def overall(judge: str, bench: str) -> dict:
        return metrics[judge]["benchmarks"][bench]["overall"]

    train, validation = split_scores(run_dir)
    constant = best_constant(train) if len(train) else None
    names = {"judge": "trained", "base": "base", "teacher": args.teacher}
    stages = {}
    for name in ("synthesize", "respond", "label", "ifd", "curate", "train"):
        manifest = os.path.join(run_dir, name, "_manifest.json")
        if os.path.exists(manifest):
            with open(manifest) as f:
                m = json.load(f)
            stages[name] = {k: m.get(k) for k in ("rows_in", "rows_out", "rows_rejected", "wall_s") if k in m}
    out = {
        "config": args.config, "overrides": args.overrides, "machine": f"{platform.machine()}, "
        f"{os.cpu_count()} CPUs", "pipeline_wall_s": round(pipeline_s, 1), "evaluate_wall_s": round(evaluate_s, 1),
        "stages": stages,
        "train_records": int(len(train)), "validation_records": int(len(validation)),
        "heldout_pairs": len(HUMAN_PAIRS),
        "heldout_pairwise_accuracy": {
            **{k: overall(v, "file")["accuracy"] for k, v in names.items()},
            "always_longer": always_longer_accuracy(),
            "random": overall("trained", "file")["random"]["accuracy"],
        },
        "position_consistency": {k: overall(names[k], "file")["position_consistency"] for k in ("judge", "base")},
        "validation_mae": {
            **{k: overall(names[k], "validation")["mae"] for k in ("judge", "base", "teacher")},
            "best_constant": float(np.abs(validation - constant).mean()) if constant is not None and len(validation)
            else None,
        },
        "validation_parse_rate": {k: overall(v, "validation")["parse_rate"] for k, v in names.items()},
        "score_entropy": {k: overall(names[k], "validation")["score_entropy"] for k in ("judge", "base")},
        "collapsed": {k: overall(names[k], "validation")["collapsed"] for k in ("judge", "base")},
        "best_constant_score": constant,
    }
    emit(out, args.out)


if __name__ == "__main__":
    main()
