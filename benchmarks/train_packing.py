"""Training throughput with sequence packing vs padding: the train recipe (Ray Train, DeepSpeed ZeRO-3,
2 CPU workers) on the same judge records, in one run.

Records look like the pipeline's label output: a rendered five-part evaluation prompt
(themis_ray.judging.render_prompt) over an instruction and a response cut from Python's docs, and a
teacher evaluation that opens with `[[n]]`. `--spread wide` draws responses and evaluations over a
wide range of lengths (records of roughly 480 to 1,100 tokens), `--spread narrow` over the
quickstart's short ones (roughly 480 to 680). Each configuration trains one epoch over the same
records; tokens per second count real (non-padding) tokens over the summed step time (forward,
backward and optimizer steps), so Ray and DeepSpeed start-up are left out of every figure alike.

Packing can only win where padding is the waste: micro-batches of several records of different
lengths. The comparison is therefore against padded micro-batches of 4:

  padded, micro-batch 4   four records per forward pass, right-padded to the longest of them (the
                          baseline; micro-batches are drawn at random, as the recipe deals them)
  packed, micro-batch 1   records packed end to end into sequences of up to --max-length tokens, one
                          sequence per forward pass: about as many tokens per pass, no padding

Global batches: 8 records padded, 4 packed sequences (about 8 records at the default lengths), so the
two take about as many optimizer steps (reported). `--with-mb1` adds padded micro-batches of 1 (no
padding to remove there), `--with-packed-mb4` packed sequences four to a micro-batch. Padded runs take
`max_length` = the longest record rounded up to 64 (it only limits them: a micro-batch is padded to its
own longest record); packed runs pack up to `--max-length`. `--activation-checkpointing` turns it on
in every run: the recipe's memory check refuses padded micro-batches of 4 x ~1,100 tokens on a 2-core,
24 GiB machine without it (about 5 GB of activations per rank).

    python benchmarks/train_packing.py --records 16 --spread wide --max-length 2048 --activation-checkpointing --out benchmarks/results/train_packing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from themis_ray import judging
from themis_ray.assets import prepare_default_model, python_docs
from themis_ray.config import TrainConfig

SCENARIOS = ("open_qa", "informative_writing", "close_qa", "programming")


SPREADS = {
    # response and explanation lengths in characters
    "narrow": ([60, 150, 300, 450], [40, 120, 250, 380]),  # the quickstart's: max_tokens 96 each
    "wide": ([60, 400, 1000, 2000], [40, 250, 500, 800]),  # longer answers and evaluations
}


def make_records(n: int, seed: int = 0, spread: str = "wide") -> list[dict]:
    """Judge records of mixed lengths, shaped like the label stage's output."""
    rng = random.Random(seed)
    responses, explanations = SPREADS[spread]
    texts = [t for t in python_docs().values() if len(t) > 5000]
    records = []
    for i in range(n):
        text = rng.choice(texts)
        start = rng.randrange(0, len(text) - 3500)
        request = judging.JudgeRequest(
            instruction=f"Explain this part of the Python documentation ({i}).",
            response=text[start:start + rng.choice(responses)],
            scenario=SCENARIOS[i % len(SCENARIOS)],
        )
        explanation = text[start + 2400:start + 2400 + rng.choice(explanations)]
        records.append({"id": f"b{i}", "prompt": judging.render_prompt(request),
                        "evaluation": f"[[{rng.randint(1, 5)}]] {explanation.strip()}"})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--spread", choices=sorted(SPREADS), default="wide")
    parser.add_argument("--max-length", type=int, default=2048, help="packing length and record limit")
    parser.add_argument("--with-mb1", action="store_true", help="also padded at micro-batch 1")
    parser.add_argument("--with-packed-mb4", action="store_true", help="also packed at micro-batch 4")
    parser.add_argument("--activation-checkpointing", action="store_true", help="in every run")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    started = time.time()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from transformers import AutoTokenizer

    from themis_ray.train import train_judge
    from themis_ray.train.collate import encode_records, pack

    model_dir = str(prepare_default_model())
    records = make_records(args.records, spread=args.spread)
    examples, rejected = encode_records(records, AutoTokenizer.from_pretrained(model_dir), args.max_length)
    if rejected:
        raise SystemExit(f"{len(rejected)} records are longer than --max-length {args.max_length}")
    lengths = sorted(len(e.input_ids) for e in examples)
    packed_sequences = pack(examples, args.max_length)  # over all records; the recipe packs its own way
    base = TrainConfig(num_workers=2, epochs=1, learning_rate=1e-5, warmup_ratio=0.0, max_length=args.max_length,
                       checkpoint_every=0, activation_checkpointing=args.activation_checkpointing)
    padded = replace(base, max_length=-(-lengths[-1] // 64) * 64)  # a limit only: each micro-batch pads to its own
    runs = {
        "padded, micro-batch 4": replace(padded, micro_batch_size=4, global_batch_size=8),
        "packed, micro-batch 1": replace(base, micro_batch_size=1, global_batch_size=4, packing=True),
    }
    if args.with_mb1:
        runs["padded, micro-batch 1"] = replace(padded, micro_batch_size=1, global_batch_size=8)
    if args.with_packed_mb4:
        runs["packed, micro-batch 4"] = replace(base, micro_batch_size=4, global_batch_size=8, packing=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    try:
        for name, cfg in runs.items():
            load_before = os.getloadavg()[0]
            with tempfile.TemporaryDirectory(prefix="themis-bench-") as tmp:
                run_started = time.time()
                s = train_judge(records, model_dir, Path(tmp) / "judge", cfg)
            results[name] = {
                "tokens_per_s": round(s["tokens_per_s"], 1),
                "packing_efficiency": round(s["packing_efficiency"], 3),
                "sequences": s["sequences"],
                "optimizer_steps": s["optimizer_steps"],
                "micro_batch_size": cfg.micro_batch_size,
                "global_batch_size": cfg.global_batch_size,
                "packing": cfg.packing,
                "max_length": cfg.max_length,
                "activation_checkpointing": cfg.activation_checkpointing,
                "wall_s": round(time.time() - run_started, 1),
                "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            }
            print(name, results[name], flush=True)
    finally:
        ray.shutdown()
    loads = [x for r in results.values() for x in r["load_average_1m_before_after"]]
    summary = {
        "records": len(examples),
        "spread": args.spread,
        "record_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1],
                          "mean": round(sum(lengths) / len(lengths), 1)},
        "max_length": args.max_length,
        "records_per_packed_sequence": round(len(examples) / len(packed_sequences), 2),
        "runs": results,
        "packed_mb1_vs_padded_mb4": round(results["packed, micro-batch 1"]["tokens_per_s"]
                                          / results["padded, micro-batch 4"]["tokens_per_s"], 2),
    }
    if args.with_packed_mb4:
        summary["packed_mb4_vs_padded_mb4"] = round(results["packed, micro-batch 4"]["tokens_per_s"]
                                                    / results["padded, micro-batch 4"]["tokens_per_s"], 2)
    summary["machine"] = {
        "platform": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average_1m": {"min": min(loads), "max": max(loads)},
        "workers": "2 Ray Train workers of 1 CPU each, DeepSpeed ZeRO-3 fp32 over gloo",
    }
    summary["command"] = "python benchmarks/train_packing.py " + " ".join(sys.argv[1:])
    summary["wall_s"] = round(time.time() - started, 1)
    summary["note"] = "one run on a 2-core machine shared with other work; configurations run one after the other"
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
