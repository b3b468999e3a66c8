"""Training throughput with sequence packing vs padding: the train recipe (Ray Train, DeepSpeed ZeRO-3,
2 CPU workers) on the same judge records, in one run.

Records look like the pipeline's label output at quickstart size: a rendered five-part evaluation
prompt (themis_ray.judging.render_prompt) over an instruction and a response cut from Python's
docs, and a short teacher evaluation that opens with `[[n]]`. Each configuration trains one epoch
over the same records; tokens per second count real (non-padding) tokens over the summed step
time, so Ray and DeepSpeed start-up are left out of every figure alike.

  padded, micro-batch 1   the quickstart's shape: no padding at all, one record per forward pass
  packed, micro-batch 1   records packed end to end into sequences of up to --max-length tokens
  padded, micro-batch 4   (--with-mb4) four records per forward pass, padded to the longest of them

    python benchmarks/train_packing.py --records 12 --max-length 1536
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from themis_ray import judging
from themis_ray.assets import prepare_default_model, python_docs
from themis_ray.config import TrainConfig

SCENARIOS = ("open_qa", "informative_writing", "close_qa", "programming")


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Judge records of mixed lengths, shaped like the label stage's output on the quickstart."""
    rng = random.Random(seed)
    texts = [t for t in python_docs().values() if len(t) > 2000]
    records = []
    for i in range(n):
        text = rng.choice(texts)
        start = rng.randrange(0, len(text) - 1200)
        request = judging.JudgeRequest(
            instruction=f"Explain this part of the Python documentation ({i}).",
            response=text[start:start + rng.choice([60, 150, 300, 450])],  # respond: max_tokens 96
            scenario=SCENARIOS[i % len(SCENARIOS)],
        )
        explanation = text[start + 500:start + 500 + rng.choice([40, 120, 250, 380])]  # label: 96 tokens
        records.append({"id": f"b{i}", "prompt": judging.render_prompt(request),
                        "evaluation": f"[[{rng.randint(1, 5)}]] {explanation.strip()}"})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=24)
    parser.add_argument("--max-length", type=int, default=2048, help="packing length and record limit")
    parser.add_argument("--with-mb4", action="store_true", help="also padded micro-batches of 4")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from transformers import AutoTokenizer

    from themis_ray.train import train_judge
    from themis_ray.train.collate import encode_records

    model_dir = str(prepare_default_model())
    records = make_records(args.records)
    examples, _ = encode_records(records, AutoTokenizer.from_pretrained(model_dir), args.max_length)
    lengths = sorted(len(e.input_ids) for e in examples)
    base = TrainConfig(num_workers=2, epochs=1, learning_rate=1e-5, warmup_ratio=0.0, max_length=args.max_length,
                       checkpoint_every=0)
    runs = {
        "padded, micro-batch 1": replace(base, micro_batch_size=1, global_batch_size=2),
        "packed, micro-batch 1": replace(base, micro_batch_size=1, global_batch_size=2, packing=True),
    }
    if args.with_mb4:  # ~2x the activation memory of the others
        runs["padded, micro-batch 4"] = replace(base, micro_batch_size=4, global_batch_size=8)
    ray.init(num_cpus=2)
    results = {}
    try:
        for name, cfg in runs.items():
            with tempfile.TemporaryDirectory(prefix="themis-bench-") as tmp:
                started = time.time()
                s = train_judge(records, model_dir, Path(tmp) / "judge", cfg)
            results[name] = {
                "tokens_per_s": round(s["tokens_per_s"], 1),
                "packing_efficiency": round(s["packing_efficiency"], 3),
                "sequences": s["sequences"],
                "optimizer_steps": s["optimizer_steps"],
                "wall_s": round(time.time() - started, 1),
            }
            print(name, results[name], flush=True)
    finally:
        ray.shutdown()
    baseline = results["padded, micro-batch 1"]["tokens_per_s"]
    packed = results["packed, micro-batch 1"]["tokens_per_s"]
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average": os.getloadavg(),
        "records": len(examples),
        "record_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
        "max_length": args.max_length,
        "runs": results,
        "packed_vs_padded_mb1": round(packed / baseline, 2),
    }
    if "padded, micro-batch 4" in results:
        summary["packed_vs_padded_mb4"] = round(packed / results["padded, micro-batch 4"]["tokens_per_s"], 2)
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
