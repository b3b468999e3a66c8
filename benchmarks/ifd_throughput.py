"""IFD scoring speed: the ifd stage's processor vs a per-record reference loop, same model, same records.

The reference is how the original IFD code (Cherry LLM) scores: one record at a time, two plain forward
passes (prompt + answer, then the answer alone after a begin token), full-vocabulary logits over the
whole sequence. The stage orders the table as its `run` does (scenario, mode, length), cuts it into
the actor pool's batches, and each batch goes through `IFDScorer.process`: the prompt prefix a batch
shares is run once, the remainders are length-sorted and left-padded, and only the answer positions'
logits are computed.

The two are timed batch by batch, alternating which goes first, so that load from other processes on a
shared machine falls on both alike; the load average, each batch's times, the median per-batch speed-up
and the process CPU time are reported too. Tokens per second count the same workload for both: prompt +
answer tokens of the conditioned pass, plus begin + answer tokens of the unconditioned pass.
`--no-prefix` also times the stage with prefix sharing off, to show what each part contributes.

    python benchmarks/ifd_throughput.py --records 24 --threads 2 --no-prefix
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import resource
import statistics
import time
from functools import partial

import pyarrow as pa
import torch

from themis_ray import judging
from themis_ray.assets import python_docs
from themis_ray.config import EngineConfig
from themis_ray.schema import output_schema
from themis_ray.stages.ifd import IFDScorer, batch_order, ifd_from_logprobs

SCENARIOS = ("open_qa", "informative_writing", "close_qa")


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Evaluation records of very different lengths in three scenarios, built from Python's docs."""
    rng = random.Random(seed)
    texts = [t for t in python_docs().values() if len(t) > 2000]
    records = []
    for i in range(n):
        text = rng.choice(texts)
        start = rng.randrange(0, len(text) - 1500)
        response = text[start:start + rng.choice([80, 300, 700, 1400])]
        request = judging.JudgeRequest(instruction=f"Explain this part of the Python docs ({i}).",
                                       response=response, scenario=SCENARIOS[i % len(SCENARIOS)])
        evaluation = f"[[{rng.randint(1, 5)}]] " + text[start:start + rng.choice([60, 200, 500])]
        records.append({"id": str(i), "scenario": request.scenario, "mode": "single",
                        "prompt": judging.render_prompt(request), "evaluation": evaluation})
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
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="the actor pool's batch (ifd.pool.batch_size)")
    parser.add_argument("--no-prefix", action="store_true", help="also time the stage without prefix sharing")
    args = parser.parse_args()
    records = make_records(args.records)
    table = pa.Table.from_pylist(records)
    ordered = [records[i] for i in batch_order(table)]
    batches = [ordered[k:k + args.batch_size] for k in range(0, len(ordered), args.batch_size)]
    schema = output_schema("ifd", table.schema)
    scorer = IFDScorer(schema, EngineConfig(num_threads=args.threads), micro_batch_size=args.batch_size)
    engine = scorer.engine
    plain = copy.copy(scorer)  # the same engine, prefix sharing off
    plain.conditioned = partial(engine.token_logprobs, batch_size=args.batch_size)
    tokens = sum(len(engine.prompt_ids(judging.build_messages(r["prompt"]))) + 1 + 2 * len(engine.text_ids(r["evaluation"]))
                 for r in records)
    scorer.process(records[:2])  # warm-up; every path shares the model
    reference_ifd(engine, records[0])

    timings = {"reference": 0.0, "stage": 0.0, "stage_no_prefix": 0.0}
    cpu = dict.fromkeys(timings, 0.0)
    per_batch = []
    reference, stage, no_prefix = {}, {}, {}
    load_before = os.getloadavg()
    for k, batch in enumerate(batches):
        runs = [("reference", lambda: reference.update({r["id"]: reference_ifd(engine, r) for r in batch})),
                ("stage", lambda: stage.update({o["id"]: o["ifd"] for o in scorer.process(batch)}))]
        if args.no_prefix:
            runs.append(("stage_no_prefix", lambda: no_prefix.update({o["id"]: o["ifd"] for o in plain.process(batch)})))
        walls = {}
        for name, fn in (runs if k % 2 == 0 else runs[::-1]):  # alternate who goes first
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            walls[name] = time.perf_counter() - start
            timings[name] += walls[name]
            cpu[name] += time.process_time() - start_cpu
        per_batch.append({name: round(t, 2) for name, t in walls.items()})
    load_after = os.getloadavg()

    def figures(name: str) -> dict:
        t = timings[name]
        return {f"{name}_s": round(t, 2), f"{name}_cpu_s": round(cpu[name], 2),
                f"{name}_records_per_s": round(len(records) / t, 4), f"{name}_tokens_per_s": round(tokens / t, 1)}

    result = {
        "records": len(records), "tokens_scored": tokens, "threads": args.threads, "batch_size": args.batch_size,
        **figures("reference"), **figures("stage"),
        **(figures("stage_no_prefix") if args.no_prefix else {}),
        "speedup": round(timings["reference"] / timings["stage"], 2),
        **({"speedup_no_prefix": round(timings["reference"] / timings["stage_no_prefix"], 2)} if args.no_prefix else {}),
        "median_batch_speedup": round(statistics.median(b["reference"] / b["stage"] for b in per_batch), 2),
        "cpu_time_speedup": round(cpu["reference"] / cpu["stage"], 2),
        "max_abs_ifd_difference": max(abs(reference[i] - stage[i]) for i in reference),
        "per_batch_s": per_batch,
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
