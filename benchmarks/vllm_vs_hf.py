"""The vllm engine against the hf engine on the same GPU: generation tokens/s and IFD records/s.

Both engines load the same model folder in the same dtype on the same GPU, one after the other (the hf
engine first, then freed, then vLLM), and run the same workload:

* generation: `--prompts` chat prompts (instructions built from Python's docs), `--max-tokens` greedy
  tokens each, in one `generate` call per `--batch` prompts; tokens/s counts generated tokens.
* IFD: `--records` evaluation records (as benchmarks/ifd_throughput.py builds them), scored in both
  passes (`token_logprobs` with and without the prompt) per `--batch` records; records/s, and the largest
  relative IFD difference between the engines on the same records.

Each workload runs `--repeats` times after one warm-up; the best time counts. Without vLLM or a GPU it
says so and exits 0, so it can sit in a script list.

    python benchmarks/vllm_vs_hf.py --prompts 256 --records 256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ifd_throughput's record builder


def skip_reason(device: str) -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'themis-ray[vllm]' on a GPU machine)"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "no GPU visible"
    return None


def workload(args):
    from ifd_throughput import make_records

    from themis_ray import judging

    records = make_records(args.records)
    prompts = [judging.build_messages(r["prompt"]) for r in records]
    answers = [r["evaluation"] for r in records]
    instructions = [[{"role": "user", "content": f"Summarise in a few sentences: {r['prompt'][-600:]}"}]
                    for r in make_records(args.prompts, seed=1)]
    return instructions, prompts, answers


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, caches, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def batches(items: list, size: int):
    return [items[i:i + size] for i in range(0, len(items), size)]


def measure(engine, args, instructions, prompts, answers) -> dict:
    from themis_ray.config import SamplingConfig
    from themis_ray.stages.ifd import ifd_from_logprobs

    sampling = SamplingConfig(max_tokens=args.max_tokens, temperature=0.0)
    generated = [0]

    def generate():
        generated[0] = sum(c.completion_tokens for chunk in batches(instructions, args.batch)
                           for c in engine.generate(chunk, sampling))

    ifd = []

    def score():
        ifd.clear()
        for p, a in zip(batches(prompts, args.batch), batches(answers, args.batch)):
            conditioned = engine.token_logprobs(p, a)
            alone = engine.token_logprobs([None] * len(a), a)
            ifd.extend(ifd_from_logprobs(c.logprobs, u.logprobs)["ifd"] if c.logprobs and u.logprobs else None
                       for c, u in zip(conditioned, alone))

    gen_s = best_time(generate, args.repeats)
    ifd_s = best_time(score, args.repeats)
    return {"generate_s": gen_s, "generated_tokens": generated[0], "tokens_per_s": generated[0] / gen_s,
            "ifd_s": ifd_s, "ifd_records_per_s": len(prompts) / ifd_s, "ifd": list(ifd)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--records", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="items per engine call (both engines)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu: a CPU build of vLLM (for a smoke run only)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    reason = skip_reason(args.device)
    if reason:
        print(f"skipped: {reason}")
        return 0

    from themis_ray.config import EngineConfig
    from themis_ray.engines import build_engine

    instructions, prompts, answers = workload(args)
    results = {}
    for kind in ("hf", "vllm"):
        cfg = EngineConfig(kind=kind, dtype=args.dtype, device=args.device, max_model_len=4096)
        engine = build_engine(cfg, f"{kind}.engine")
        results[kind] = measure(engine, args, instructions, prompts, answers)
        engine.close()
        del engine
        gc.collect()
        if args.device == "cuda":
            import torch

            torch.cuda.empty_cache()
    pairs = [(v, h) for v, h in zip(results["vllm"]["ifd"], results["hf"]["ifd"]) if v is not None and h is not None]
    worst = max((abs(v - h) / abs(h) for v, h in pairs), default=None)
    summary = {
        "machine": platform.node(),
        "gpu": _gpu_name(args.device),
        "args": vars(args),
        "generation_tokens_per_s": {k: round(r["tokens_per_s"], 1) for k, r in results.items()},
        "generation_speedup": round(results["vllm"]["tokens_per_s"] / results["hf"]["tokens_per_s"], 2),
        "ifd_records_per_s": {k: round(r["ifd_records_per_s"], 2) for k, r in results.items()},
        "ifd_speedup": round(results["vllm"]["ifd_records_per_s"] / results["hf"]["ifd_records_per_s"], 2),
        "ifd_max_relative_difference": worst,
        "ifd_records_compared": len(pairs),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


def _gpu_name(device: str) -> str:
    if device != "cuda":
        return "none (CPU build of vLLM)"
    import torch

    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    sys.exit(main())
