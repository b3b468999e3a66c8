"""Does a short SFT teach the embedded model to judge records it has never seen? Base model vs
fine-tuned judge vs the best constant, on held-out records and, beside them, on training records.

Judge records are built so that the teacher's labelling rule is known and learnable: close-QA
instructions with responses that answer (teacher score 5), hedge (4), refuse (1) or ignore the
question (2), each with a short teacher evaluation opening with `[[n]]`. The held-out records share
nothing with the training records but the rule: their questions and facts come from a separate
list, and every response template (answer, hedge, refusal, off-topic sentence) has its own phrasings
for each set, worded without the training phrasings' cue words (sorry, cannot, think, maybe, talk
about...), so no instruction, fact, template or filled response appears in both (`assert_disjoint`)
and a rule keyed on the training templates' words does not carry over by itself. The train recipe
(Ray Train, DeepSpeed ZeRO-3, 2 CPU workers) fine-tunes the embedded SmolLM2-135M-Instruct on the
training records; the base model and the judge then answer greedily through the `hf` engine, and
judging.parse_evaluation reads the score.

Figures per set (held-out, and a sample of the training records), per judge: the share of outputs
with a parsable `[[n]]`, MAE against the teacher (an unparsable output counts as the scale's
midpoint, 3) and Agr(2,2) (the paper's agreement: 1/(|d|+1)^2 for |d| < 2, else 0; an unparsable
output counts 0). Baselines: the base model, and the best constant predictor on the training labels
(the score minimising MAE on the training records, ties to the middle of the scale).

    python benchmarks/train_learning_check.py --train 48 --heldout 16 --epochs 2 --out benchmarks/results/train_learning_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

from themis_ray import judging
from themis_ray.assets import prepare_default_model
from themis_ray.config import EngineConfig, SamplingConfig, TrainConfig

# (question, answer): the first TRAIN_FACTS for training records, the rest held out.
FACTS = [
    ("What is the capital of France?", "Paris"), ("How many legs does a spider have?", "Eight"),
    ("What gas do plants absorb from the air?", "Carbon dioxide"), ("Who wrote Hamlet?", "William Shakespeare"),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees"),
    ("Which planet is known as the Red Planet?", "Mars"), ("What is the largest ocean on Earth?", "The Pacific"),
    ("How many days are in a leap year?", "366"), ("What is the chemical symbol for gold?", "Au"),
    ("Which language is spoken in Brazil?", "Portuguese"), ("What is the square root of 81?", "9"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"), ("What is the freezing point of water in Fahrenheit?", "32"),
    ("How many continents are there?", "Seven"), ("What is the tallest mountain in the world?", "Mount Everest"),
    ("Which organ pumps blood through the body?", "The heart"), ("What is the capital of Japan?", "Tokyo"),
    ("How many sides does a hexagon have?", "Six"), ("What is the hardest natural substance?", "Diamond"),
    ("Who developed the theory of relativity?", "Albert Einstein"), ("What is the largest planet in our solar system?", "Jupiter"),
    ("Which element has the chemical symbol O?", "Oxygen"), ("How many minutes are in an hour?", "Sixty"),
    ("What is the capital of Italy?", "Rome"), ("Which animal is known as the king of the jungle?", "The lion"),
    ("What is the main language spoken in Mexico?", "Spanish"), ("How many strings does a standard guitar have?", "Six"),
    ("What is the currency of the United Kingdom?", "The pound sterling"), ("Who was the first person to walk on the Moon?", "Neil Armstrong"),
    ("What is the longest river in Africa?", "The Nile"), ("How many bones are in the adult human body?", "206"),
    ("What colour do you get by mixing blue and yellow?", "Green"), ("Which bird is a symbol of peace?", "The dove"),
    ("What is the capital of Canada?", "Ottawa"), ("How many players are on a football (soccer) team on the field?", "Eleven"),
    ("What is the smallest prime number?", "2"), ("Which instrument has 88 keys?", "The piano"),
    ("What is the capital of Australia?", "Canberra"), ("Who discovered penicillin?", "Alexander Fleming"),
    ("Which metal is liquid at room temperature?", "Mercury"), ("How many hours are in a day?", "Twenty-four"),
    ("What is the largest desert in the world?", "The Antarctic desert"), ("Which country is home to the kangaroo?", "Australia"),
    ("What is the capital of Germany?", "Berlin"), ("How many weeks are in a year?", "Fifty-two"),
    ("What do bees make?", "Honey"), ("Which planet is closest to the Sun?", "Mercury the planet"),
    ("What is the main ingredient of guacamole?", "Avocado"),
    # held out from here on
    ("What is the capital of Spain?", "Madrid"), ("How many wheels does a tricycle have?", "Three"),
    ("Who wrote Pride and Prejudice?", "Jane Austen"), ("What is the largest mammal?", "The blue whale"),
    ("What is the capital of Portugal?", "Lisbon"), ("What is the capital of Egypt?", "Cairo"),
    ("How many months have 31 days?", "Seven months"), ("Which scientist proposed the laws of motion?", "Isaac Newton"),
    ("What is the chemical symbol for sodium?", "Na"), ("How many teeth does an adult human usually have?", "Thirty-two"),
    ("Which ocean lies between Africa and Australia?", "The Indian Ocean"), ("What is the capital of Russia?", "Moscow"),
    ("What is the square of 12?", "144"), ("Which fruit keeps the doctor away, according to the saying?", "An apple"),
    ("What is the fastest land animal?", "The cheetah"), ("In which country are the pyramids of Giza?", "Egypt"),
    ("What is the capital of Kenya?", "Nairobi"), ("How many sides does a pentagon have?", "Five"),
    ("Who composed the Fifth Symphony that opens with four famous notes?", "Ludwig van Beethoven"),
    ("What is frozen water called?", "Ice"),
]
TRAIN_FACTS = 48
# Response templates per set and kind: the held-out phrasings share no template and none of the
# training phrasings' cue words. What fills them is per set too: answers and hedges name their
# record's fact, off-topic replies a topic and refusals a reason from the set's own list.
TEMPLATES = {
    "train": {
        "answer": ["{a}.", "It is {a}.", "The answer is {a}.", "{a}, of course.", "That would be {a}."],
        "hedged": ["I think it is {a}, but I am not completely sure.", "Maybe {a}? I could be wrong.",
                   "Possibly {a}, though I would double-check.", "I believe {a}, but please verify it."],
        "refusal": ["I'm sorry, I can't help with {r}.", "I cannot answer {r}.", "Sorry, I won't respond to {r}.",
                    "Unfortunately, I am unable to assist with {r}."],
        "off_topic": ["Let's talk about {t} instead.", "I would rather tell you about {t}.",
                      "By the way, {t} is my favourite subject.", "Have you ever thought about {t}?"],
    },
    "heldout": {
        "answer": ["Easy: {a}.", "{a} is correct.", "Definitely {a}."],
        "hedged": ["{a}, if memory serves.", "Probably {a}, going from memory.", "{a}, I guess; do not quote me."],
        "refusal": ["No, {r} is not something I will get into.", "I'd prefer to skip {r}.",
                    "Please ask someone else about {r}."],
        "off_topic": ["Fun fact: {t} is a great pastime.", "Here is something else entirely: {t}.",
                      "Speaking of hobbies, {t} deserves more attention."],
    },
}
FILLERS = {  # per set: refusal reasons (r) and off-topic subjects (t)
    "train": {"r": ["that", "this request", "questions like this", "such questions", "this one", "your question"],
              "t": ["football", "cooking pasta", "my holiday", "jazz music", "gardening tips", "old cars",
                    "knitting", "mobile phones"]},
    "heldout": {"r": ["this kind of request", "that question", "requests of this sort"],
                "t": ["birdwatching", "chess openings", "baking bread", "mountain hiking"]},
}
KINDS = {  # response kind -> (teacher score, evaluation)
    "answer": (5, "[[5]] The response answers the question correctly and directly."),
    "hedged": (4, "[[4]] Correct, though it hedges."),
    "refusal": (1, "[[1]] The response refuses to answer."),
    "off_topic": (2, "[[2]] The response ignores the question."),
}


def make_records(n: int, split: str, seed: int) -> list[dict]:
    """`n` judge records from the `split` ("train" or "heldout") facts and templates, kinds balanced."""
    rng = random.Random(f"{split}:{seed}")
    facts = FACTS[:TRAIN_FACTS] if split == "train" else FACTS[TRAIN_FACTS:]
    kinds = [list(KINDS)[i % len(KINDS)] for i in range(n)]
    rng.shuffle(kinds)
    order = list(range(len(facts)))
    rng.shuffle(order)
    records = []
    for i, kind in enumerate(kinds):
        question, answer = facts[order[i % len(facts)]]
        score, evaluation = KINDS[kind]
        fill = {"a": answer, "r": rng.choice(FILLERS[split]["r"]), "t": rng.choice(FILLERS[split]["t"])}
        template = rng.choice(TEMPLATES[split][kind])
        response = template.format(**fill)
        request = judging.JudgeRequest(instruction=question, scenario="close_qa", response=response)
        records.append({"id": f"{split}-{seed}-{i}", "instruction": question, "fact": answer, "template": template,
                        "response": response, "prompt": judging.render_prompt(request), "evaluation": evaluation,
                        "score": score})
    return records


def assert_disjoint(train: list[dict], heldout: list[dict]) -> None:
    """No instruction, fact, template or filled template (response) of a held-out record is in the
    training set."""
    for key in ("instruction", "fact", "template", "response", "prompt"):
        shared = {r[key] for r in train} & {r[key] for r in heldout}
        assert not shared, f"held-out records share {key}s with the training records: {sorted(shared)[:3]}"


def judge_outputs(model_dir: str, records: list[dict], max_tokens: int = 12) -> list[float | None]:
    from themis_ray.engines import build_engine

    engine = build_engine(EngineConfig(model=model_dir, num_threads=2))
    try:
        done = engine.generate([judging.build_messages(r["prompt"]) for r in records],
                               SamplingConfig(max_tokens=max_tokens, temperature=0.0))
    finally:
        engine.close()
    return [judging.parse_evaluation(c.text).score if not c.error else None for c in done]


def figures(scores: list[float | None], gold: list[int]) -> dict:
    """parse rate; MAE with an unparsable output as the midpoint 3; Agr(2,2) with it as 0."""
    parsed = [s is not None for s in scores]
    mae = sum(abs((3.0 if s is None else s) - g) for s, g in zip(scores, gold)) / len(gold)
    agr = sum(0.0 if s is None or abs(s - g) >= 2 else 1.0 / (abs(s - g) + 1) ** 2
              for s, g in zip(scores, gold)) / len(gold)
    return {"parse_rate": round(sum(parsed) / len(gold), 3), "mae": round(mae, 3), "agr_2_2": round(agr, 3)}


def best_constant(train_scores: list[int], low: int = 1, high: int = 5) -> int:
    """The integer score minimising MAE on the training labels (ties: nearest the scale's middle)."""
    middle = (low + high) / 2
    return min(range(low, high + 1),
               key=lambda c: (sum(abs(c - s) for s in train_scores), abs(c - middle)))


def run_check(train: list[dict], heldout: list[dict], train_eval: list[dict], cfg: TrainConfig, work: Path,
              base_on_train: bool = True) -> dict:
    """Base model and fine-tuned judge on the held-out and training-sample records (the base model on
    the held-out ones only without `base_on_train`); Ray must be up."""
    from themis_ray.train import train_judge

    assert_disjoint(train, heldout)
    model_dir = str(prepare_default_model())
    sets = {"heldout": heldout, "train": train_eval}
    gold = {name: [r["score"] for r in rows] for name, rows in sets.items()}
    constant = best_constant([r["score"] for r in train])
    result = {"best_constant": constant, "base": {}, "trained": {}, "constant": {}}
    for name, rows in sets.items():
        if base_on_train or name == "heldout":
            result["base"][name] = figures(judge_outputs(model_dir, rows), gold[name])
        result["constant"][name] = figures([constant] * len(rows), gold[name])
    summary = train_judge(train, model_dir, work / "judge", cfg)
    for name, rows in sets.items():
        result["trained"][name] = figures(judge_outputs(summary["judge_dir"], rows), gold[name])
    result["train_summary"] = {k: summary[k] for k in ("steps", "optimizer_steps", "first_loss", "final_loss",
                                                       "records", "sequences", "wall_s")}
    return result


def check_config(epochs: int, learning_rate: float, sim_loss_weight: float = 0.0) -> TrainConfig:
    return TrainConfig(num_workers=2, epochs=epochs, global_batch_size=4, micro_batch_size=1,
                       learning_rate=learning_rate, warmup_ratio=0.1, max_length=1024, checkpoint_every=0,
                       sim_loss_weight=sim_loss_weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--heldout", type=int, default=16)
    parser.add_argument("--train-eval", type=int, default=16, help="training records scored beside the held-out")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--sim-loss-weight", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    train = make_records(args.train, "train", args.seed)
    heldout = make_records(args.heldout, "heldout", args.seed)
    cfg = check_config(args.epochs, args.learning_rate, args.sim_loss_weight)
    started = time.time()
    ray.init(num_cpus=2)
    try:
        with tempfile.TemporaryDirectory(prefix="themis-learn-") as tmp:
            result = run_check(train, heldout, train[: args.train_eval], cfg, Path(tmp))
    finally:
        ray.shutdown()
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average": os.getloadavg(),
        "command": "python benchmarks/train_learning_check.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
        "train_records": len(train), "heldout_records": len(heldout), "train_eval_records": min(args.train_eval, len(train)),
        "epochs": args.epochs, "learning_rate": args.learning_rate, **result,
        "wall_s": round(time.time() - started, 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
