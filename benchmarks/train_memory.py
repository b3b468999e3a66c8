"""Memory per rank of the train recipe: partitioned loading vs a full load, activation checkpointing on vs off.

A Qwen2-family model is built from a config with random weights (about 208M parameters: hidden 1024,
14 layers, GQA with 4 KV heads, the embedded model's 49,152-token vocabulary and tokenizer) and saved
as a Hugging Face folder in fp32, the training dtype on CPU. The train recipe (Ray Train, DeepSpeed
ZeRO-3, 2 CPU workers, gloo) then trains on it in four configurations, a few optimizer steps each:

  load, partitioned   the model built inside deepspeed.zero.Init (train.partitioned_load: true)
  load, full          the whole model loaded on every rank, then partitioned by deepspeed.initialize
                      (the recipe before partitioned loading)
  long, checkpointing off / on   one 2,048-token record per micro-batch, the same records and seed

Each rank reports its resident memory by phase (`memory_mib_per_rank` in the summary): RSS before the
model, peak RSS (ru_maxrss) through loading, through deepspeed.initialize and through the last
training step; the per-step losses come from the metrics file, and throughput as real tokens per
second of step time (start-up excluded).

    python benchmarks/train_memory.py --out benchmarks/results/train_memory.json
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

from themis_ray.config import TrainConfig


def build_model(folder: Path, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int) -> int:
    """A random-initialised Qwen2 model with the embedded model's tokenizer, saved to `folder`."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from themis_ray.assets import prepare_default_model

    tokenizer = AutoTokenizer.from_pretrained(prepare_default_model())
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def make_records(n: int, words: int, seed: int = 0) -> list[dict]:
    from themis_ray.assets import python_docs

    rng = random.Random(seed)
    text = " ".join(python_docs().values()).split()
    records = []
    for i in range(n):
        start = rng.randrange(0, len(text) - 2 * words)
        records.append({"id": f"m{i}", "prompt": " ".join(text[start:start + words]),
                        "evaluation": f"[[{rng.randint(1, 5)}]] " + " ".join(text[start + words:start + words + 40])})
    return records


def run(name: str, records: list[dict], model_dir: str, cfg: TrainConfig) -> dict:
    from themis_ray.train import train_judge

    with tempfile.TemporaryDirectory(prefix="themis-mem-") as tmp:
        started = time.time()
        s = train_judge(records, model_dir, Path(tmp) / "judge", cfg)
        losses = [json.loads(line)["loss"] for line in (Path(tmp) / "train_metrics.jsonl").read_text().splitlines()]
    out = {
        "partitioned_load": cfg.partitioned_load, "activation_checkpointing": cfg.activation_checkpointing,
        "max_length": cfg.max_length, "steps": s["optimizer_steps"], "losses": losses,
        "tokens_per_s": round(s["tokens_per_s"], 2), "record_tokens": s["tokens"] // max(1, s["records"]),
        "memory_mib_per_rank": s["memory_mib_per_rank"], "estimate": s["memory_estimate"],
        "wall_s": round(time.time() - started, 1),
    }
    print(name, json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration")
    parser.add_argument("--long", type=int, default=2048, help="tokens per record in the checkpointing runs")
    parser.add_argument("--only", choices=["load", "checkpointing"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    base = TrainConfig(num_workers=2, global_batch_size=2, micro_batch_size=1, epochs=1, learning_rate=1e-4,
                       warmup_ratio=0.0, checkpoint_every=0, max_length=512)
    with tempfile.TemporaryDirectory(prefix="themis-mem-model-") as model_tmp:
        params = build_model(Path(model_tmp), args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads)
        print(f"model: {params / 1e6:.1f}M parameters", flush=True)
        ray.init(num_cpus=2)
        results = {}
        try:
            if args.only in (None, "load"):
                short = make_records(2 * args.steps, words=150)
                for name, partitioned in (("load, partitioned", True), ("load, full", False)):
                    results[name] = run(name, short, model_tmp, replace(base, partitioned_load=partitioned))
            if args.only in (None, "checkpointing"):
                # ~1.25 tokens per word of these docs: records just under the limit, one per micro-batch.
                long = make_records(2 * args.steps, words=int(args.long / 1.5), seed=1)
                for name, ckpt in (("long, checkpointing off", False), ("long, checkpointing on", True)):
                    results[name] = run(name, long, model_tmp,
                                        replace(base, max_length=args.long + 256, activation_checkpointing=ckpt))
        finally:
            ray.shutdown()
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average": os.getloadavg(),
        "command": "python benchmarks/train_memory.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
        "params": params, "model": {k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "heads", "kv_heads")},
        "runs": results,
    }
    peak = lambda run, key: max(r[key] for r in run["memory_mib_per_rank"])  # noqa: E731
    if "load, full" in results:
        p, f = results["load, partitioned"], results["load, full"]
        summary["load_peak_ratio"] = round(peak(p, "load_peak") / peak(f, "load_peak"), 3)
        summary["initialize_peak_ratio"] = round(peak(p, "initialize_peak") / peak(f, "initialize_peak"), 3)
        summary["train_peak_ratio"] = round(peak(p, "train_peak") / peak(f, "train_peak"), 3)
    if "long, checkpointing on" in results:
        on, off = results["long, checkpointing on"], results["long, checkpointing off"]
        summary["checkpointing_train_peak_ratio"] = round(peak(on, "train_peak") / peak(off, "train_peak"), 3)
        summary["checkpointing_throughput_ratio"] = round(on["tokens_per_s"] / off["tokens_per_s"], 3)
        summary["checkpointing_losses_identical"] = on["losses"] == off["losses"]
        summary["checkpointing_max_loss_difference"] = max(abs(a - b) for a, b in zip(on["losses"], off["losses"]))
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
