"""Does a short SFT teach the embedded model to judge? Base model vs fine-tuned judge, same held-out records.

Judge records are built so that the teacher's labelling rule is known and learnable: close-QA
instructions with responses that answer (teacher score 5, or 4 when the answer hedges) or do not
(score 1 for a refusal, 2 for an off-topic reply), each with a short teacher evaluation opening with
`[[n]]`. The train recipe (Ray Train, DeepSpeed ZeRO-3, 2 CPU workers) fine-tunes the embedded
SmolLM2-135M-Instruct on the training split; then the base model and the judge each answer every
held-out prompt greedily through the `hf` engine, and judging.parse_evaluation reads the score.

Figures: the share of outputs with a parsable `[[n]]`, and MAE against the teacher's scores (an
unparsable output counts as the scale's midpoint, 3), beside the MAE of always predicting the most
common training score.

    python benchmarks/train_learning_check.py --train 48 --heldout 16 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

from themis_ray import judging
from themis_ray.assets import prepare_default_model
from themis_ray.config import EngineConfig, SamplingConfig, TrainConfig

FACTS = [
    ("What is the capital of France?", "Paris"), ("How many legs does a spider have?", "Eight"),
    ("What gas do plants absorb from the air?", "Carbon dioxide"), ("Who wrote Hamlet?", "William Shakespeare"),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees"),
    ("Which planet is known as the Red Planet?", "Mars"), ("What is the largest ocean on Earth?", "The Pacific"),
    ("How many days are in a leap year?", "366"), ("What is the chemical symbol for gold?", "Au"),
    ("Which language is spoken in Brazil?", "Portuguese"), ("What is the square root of 81?", "9"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"), ("What is the freezing point of water in Fahrenheit?", "32"),
    ("How many continents are there?", "Seven"), ("What is the tallest mountain in the world?", "Mount Everest"),
    ("Which organ pumps blood through the body?", "The heart"),
]
OFF_TOPIC = ["Bananas are rich in potassium.", "My favourite colour is blue.", "The train leaves at noon.",
             "Cats sleep for most of the day."]
KINDS = {  # response kind -> (teacher score, response template, evaluation)
    "answer": (5, "{a}.", "[[5]] The response answers the question correctly and directly."),
    "hedged": (4, "I think it is {a}, but I am not completely sure.", "[[4]] Correct, though it hedges."),
    "refusal": (1, "I'm sorry, I can't help with that.", "[[1]] The response refuses to answer."),
    "off_topic": (2, "{o}", "[[2]] The response ignores the question."),
}


def make_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        question, answer = FACTS[i % len(FACTS)]
        kind = list(KINDS)[(i // len(FACTS) + i) % len(KINDS)]
        score, template, evaluation = KINDS[kind]
        request = judging.JudgeRequest(instruction=question, scenario="close_qa",
                                       response=template.format(a=answer, o=rng.choice(OFF_TOPIC)))
        records.append({"id": f"{seed}-{i}", "prompt": judging.render_prompt(request),
                        "evaluation": evaluation, "score": score})
    return records


def judge_outputs(model_dir: str, records: list[dict]) -> list[float | None]:
    from themis_ray.engines import build_engine

    engine = build_engine(EngineConfig(model=model_dir, num_threads=2))
    try:
        done = engine.generate([judging.build_messages(r["prompt"]) for r in records],
                               SamplingConfig(max_tokens=24, temperature=0.0))
    finally:
        engine.close()
    return [judging.parse_evaluation(c.text).score if not c.error else None for c in done]


def figures(scores: list[float | None], gold: list[int]) -> dict:
    parsed = [s is not None for s in scores]
    mae = sum(abs((3.0 if s is None else s) - g) for s, g in zip(scores, gold)) / len(gold)
    return {"parse_rate": round(sum(parsed) / len(gold), 3), "mae": round(mae, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--sim-loss-weight", type=float, default=0.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from themis_ray.train import train_judge

    model_dir = str(prepare_default_model())
    train, heldout = make_records(args.train, seed=1), make_records(args.heldout, seed=2)
    gold = [r["score"] for r in heldout]
    common = Counter(r["score"] for r in train).most_common(1)[0][0]
    started = time.time()
    base = figures(judge_outputs(model_dir, heldout), gold)
    cfg = TrainConfig(num_workers=2, epochs=args.epochs, global_batch_size=4, micro_batch_size=1,
                      learning_rate=args.learning_rate, warmup_ratio=0.1, max_length=1024, checkpoint_every=0,
                      sim_loss_weight=args.sim_loss_weight)
    ray.init(num_cpus=2)
    try:
        with tempfile.TemporaryDirectory(prefix="themis-learn-") as tmp:
            summary = train_judge(train, model_dir, Path(tmp) / "judge", cfg)
            ray.shutdown()
            tuned = figures(judge_outputs(summary["judge_dir"], heldout), gold)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average": os.getloadavg(),
        "train_records": len(train), "heldout_records": len(heldout), "epochs": args.epochs,
        "optimizer_steps": summary["optimizer_steps"], "first_loss": round(summary["first_loss"], 3),
        "final_loss": round(summary["final_loss"], 3), "base": base, "trained": tuned,
        "majority_score": common, "majority_mae": round(sum(abs(common - g) for g in gold) / len(gold), 3),
        "wall_s": round(time.time() - started, 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
