"""IFD scoring speed: the ifd stage's processor vs a per-record reference loop, same model, same records.

The reference is how the original IFD code scores: one record at a time, two forward passes (prompt +
answer, then answer alone), full-vocabulary logits over the whole sequence. The stage batches
length-sorted records, left-pads them and computes logits only for the answer positions.

    python benchmarks/ifd_throughput.py --records 48 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import time

import torch

from themis_ray import judging
from themis_ray.assets import python_docs
from themis_ray.config import EngineConfig
from themis_ray.engines import build_engine
from themis_ray.stages.ifd import IFDScorer, ifd_from_logprobs
from themis_ray.schema import output_schema


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Evaluation records of very different lengths, built from Python's docs."""
    rng = random.Random(seed)
    texts = [t for t in python_docs().values() if len(t) > 2000]
    records = []
    for i in range(n):
        text = rng.choice(texts)
        start = rng.randrange(0, len(text) - 1500)
        response = text[start:start + rng.choice([80, 300, 700, 1400])]
        request = judging.JudgeRequest(instruction=f"Explain this part of the Python docs ({i}).",
                                       response=response, scenario="open_qa")
        evaluation = f"[[{rng.randint(1, 5)}]] " + text[start:start + rng.choice([60, 200, 500])]
        records.append({"id": str(i), "prompt": judging.render_prompt(request), "evaluation": evaluation})
    return records


@torch.inference_mode()
def reference_ifd(engine, record: dict) -> float:
    """One record, two plain forward passes, full logits: the per-record baseline."""
    def answer_logprobs(prompt_ids: list[int], answer_ids: list[int]) -> list[float]:
        ids = torch.tensor([prompt_ids + answer_ids])
        logp = torch.log_softmax(engine.model(input_ids=ids).logits[0].float(), dim=-1)
        return [logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(answer_ids)]

    answer = engine.text_ids(record["evaluation"])
    conditioned = answer_logprobs(engine.prompt_ids(judging.build_messages(record["prompt"])), answer)
    alone = answer_logprobs(engine.prompt_ids(None), answer)
    return ifd_from_logprobs(conditioned, alone)["ifd"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    records = make_records(args.records)
    engine_cfg = EngineConfig(num_threads=args.threads)
    import pyarrow as pa

    scorer = IFDScorer(output_schema("ifd", pa.schema([("id", pa.string()), ("prompt", pa.string()),
                                                        ("evaluation", pa.string())])), engine_cfg)
    engine = scorer.engine
    tokens = sum(len(engine.prompt_ids(judging.build_messages(r["prompt"]))) + 2 * len(engine.text_ids(r["evaluation"]))
                 for r in records)
    scorer.process(records[:2])  # warm-up, both paths share the model
    reference_ifd(engine, records[0])

    start = time.perf_counter()
    reference = [reference_ifd(engine, r) for r in records]
    t_ref = time.perf_counter() - start

    start = time.perf_counter()
    out = []
    for k in range(0, len(records), args.batch_size):
        out += scorer.process(records[k:k + args.batch_size])
    t_stage = time.perf_counter() - start

    max_diff = max(abs(a - b["ifd"]) for a, b in zip(reference, out))
    result = {
        "records": len(records), "tokens_scored": tokens, "threads": args.threads, "batch_size": args.batch_size,
        "reference_s": round(t_ref, 2), "stage_s": round(t_stage, 2),
        "reference_records_per_s": round(len(records) / t_ref, 3), "stage_records_per_s": round(len(records) / t_stage, 3),
        "reference_tokens_per_s": round(tokens / t_ref, 1), "stage_tokens_per_s": round(tokens / t_stage, 1),
        "speedup": round(t_ref / t_stage, 2), "max_abs_ifd_difference": max_diff,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
