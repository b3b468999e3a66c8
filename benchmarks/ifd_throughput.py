"""IFD scoring speed: the ifd stage's processor vs a per-record reference loop, same model, same records.

The reference is how the original IFD code (Cherry LLM) scores: one record at a time, two plain forward
passes (prompt + answer, then the answer alone after a begin token), full-vocabulary logits over the
whole sequence. The stage orders the table as its `run` does (scenario, mode), cuts it into
the actor pool's batches, and each batch goes through `IFDScorer.process`: the prompt prefix a batch
shares is run once, the remainders are length-sorted and left-padded, and only the answer positions'
logits are computed.

The two are timed batch by batch, alternating which goes first, `--repeats` times, so that load from
other processes on a shared machine falls on both alike. The headline figures sum each batch's least
disturbed time (its minimum over the repeats, as `timeit` does); means over the repeats, the median
per-batch speed-up, the process CPU time, every batch's times and the load average are reported too. Tokens per second count the same workload for both: prompt +
answer tokens of the conditioned pass, plus begin + answer tokens of the unconditioned pass.
`--no-prefix` also times the stage with prefix sharing off, to show what each part contributes;
`--workers 2` also times it as two single-threaded processes (what an actor pool of two one-CPU actors
with `num_threads: 1` runs, without Ray's scheduling), each batch going to one of them.

Ratios are like for like: the float32 stage against the float32 reference (`speedup`), and with
`--bf16` the bfloat16 stage against the same reference loop run on the bfloat16 model
(`speedup_bf16`). The bfloat16 IFD is also compared with the float32 reference's, for what the lower
precision costs. `--out` writes the JSON document there as well.

    python benchmarks/ifd_throughput.py --records 16 --repeats 3 --bf16 --out benchmarks/results/ifd_throughput.json
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import platform
import random
import resource
import statistics
import sys
import time

import pyarrow as pa
import torch

from _endpoint import emit
from themis_ray import judging
from themis_ray.assets import python_docs
from themis_ray.config import EngineConfig, IFDConfig
from themis_ray.schema import output_schema
from themis_ray.stages.ifd import IFDScorer, ifd_from_logprobs

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
def stage_order(records: list[dict]) -> list[dict]:
    """The order `ifd.run` cuts batches in when a window holds every record: sorted by scenario and mode."""
    return sorted(records, key=lambda r: (r["scenario"], r["mode"]))


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


_WORKER: dict = {}


def _init_worker(schema: pa.Schema, micro_batch_size: int, max_padding: float, warm_up: list[dict]) -> None:
    """One single-threaded stage processor per process, as in an actor pool of one-CPU actors."""
    scorer = IFDScorer(schema, EngineConfig(num_threads=1), micro_batch_size=micro_batch_size,
                       max_padding=max_padding)
    scorer.process(warm_up)
    _WORKER["scorer"] = scorer


def _process_batch(batch: list[dict]) -> dict:
    return {o["id"]: o["ifd"] for o in _WORKER["scorer"].process(batch)}


def bf16_figures(reference: dict, bf16: dict, reference_bf16: dict, best: dict, total: dict, walls: dict,
                 cpu: dict) -> dict:
    """Speed of the bfloat16 stage against the bfloat16 reference loop (like for like), and how far its
    IFD moves from the float32 reference: absolute and relative differences, rank agreement (what
    top-k% filtering uses), and flips of Cherry's IFD > 1 rule."""
    from scipy.stats import spearmanr

    ids = sorted(reference)
    ref, low = [reference[i] for i in ids], [bf16[i] for i in ids]
    return {"speedup_bf16": round(best["reference_bf16"] / best["stage_bf16"], 2),
            "speedup_bf16_mean": round(total["reference_bf16"] / total["stage_bf16"], 2),
            "median_batch_speedup_bf16": round(statistics.median(
                r / s for rs, ss in zip(walls["reference_bf16"], walls["stage_bf16"]) for r, s in zip(rs, ss)), 2),
            "cpu_time_speedup_bf16": round(cpu["reference_bf16"] / cpu["stage_bf16"], 2),
            "max_abs_ifd_difference_bf16_stage_vs_bf16_reference": max(abs(reference_bf16[i] - bf16[i]) for i in ids),
            # not like for like (different dtypes); what bfloat16 as a whole buys over the float32 loop
            "stage_bf16_vs_fp32_reference": round(best["reference"] / best["stage_bf16"], 2),
            "max_abs_ifd_difference_bf16": round(max(abs(a - b) for a, b in zip(ref, low)), 5),
            "mean_rel_ifd_difference_bf16": round(statistics.fmean(abs(a - b) / abs(a) for a, b in zip(ref, low)), 5),
            "spearman_ifd_bf16_vs_fp32": round(float(spearmanr(ref, low).statistic), 4),
            "ifd_above_one_flips_bf16": sum((a > 1) != (b > 1) for a, b in zip(ref, low))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="the actor pool's batch (ifd.pool.batch_size)")
    parser.add_argument("--micro-batch-size", type=int, default=IFDConfig.micro_batch_size)
    parser.add_argument("--max-padding", type=float, default=IFDConfig.max_padding)
    parser.add_argument("--no-prefix", action="store_true", help="also time the stage without prefix sharing")
    parser.add_argument("--repeats", type=int, default=3, help="times each batch is timed per path")
    parser.add_argument("--bf16", action="store_true",
                        help="also time the stage with the model in bfloat16 (vs the float32 reference)")
    parser.add_argument("--workers", type=int, default=0,
                        help="also time the stage as N single-threaded processes, each batch to one of them")
    parser.add_argument("--out", help="also write the JSON document here")
    args = parser.parse_args()
    started = time.time()
    records = make_records(args.records)
    table = pa.Table.from_pylist(records)
    ordered = stage_order(records)
    batches = [ordered[k:k + args.batch_size] for k in range(0, len(ordered), args.batch_size)]
    schema = output_schema("ifd", table.schema)
    scorer = IFDScorer(schema, EngineConfig(num_threads=args.threads), micro_batch_size=args.micro_batch_size,
                       max_padding=args.max_padding)
    engine = scorer.engine
    plain = copy.copy(scorer)  # the same engine, prefix sharing off
    plain.options = {**scorer.options, "share_prefix": False}
    tokens = sum(len(engine.prompt_ids(judging.build_messages(r["prompt"]))) + 1 + 2 * len(engine.text_ids(r["evaluation"]))
                 for r in records)
    scorer.process(records[:2])  # warm-up; every path shares the model
    reference_ifd(engine, records[0])

    names = ["reference", "stage"] + (["stage_no_prefix"] if args.no_prefix else [])
    bf16 = None
    if args.bf16:  # its own engine: the same weights in bfloat16, for the stage and the reference loop
        names += ["reference_bf16", "stage_bf16"]
        bf16 = IFDScorer(schema, EngineConfig(num_threads=args.threads, dtype="bfloat16"),
                         micro_batch_size=args.micro_batch_size, max_padding=args.max_padding)
        bf16.process(records[:2])
        reference_ifd(bf16.engine, records[0])
    pool = None
    if args.workers:
        names.append(f"stage_{args.workers}x1")
        pool = multiprocessing.get_context("spawn").Pool(
            args.workers, _init_worker, (schema, args.micro_batch_size, args.max_padding, records[:2]))
        pool.map(_process_batch, [records[:1]] * args.workers)  # wait until every worker is up
    workers = {}
    # Units of `workers` batches (one batch without workers): the workers take a unit's batches at
    # once, the other paths one after the other; each unit's time is shared out to its batches.
    units = [list(range(k, min(k + max(1, args.workers), len(batches)))) for k in
             range(0, len(batches), max(1, args.workers))]
    walls: dict[str, list[list[float]]] = {n: [[] for _ in batches] for n in names}  # [batch][repeat]
    cpu = dict.fromkeys(names, 0.0)
    reference, stage, no_prefix, stage_bf16, reference_bf16 = {}, {}, {}, {}, {}
    load_before = os.getloadavg()
    load_samples = [load_before[0]]
    for repeat in range(args.repeats):
        for u, unit in enumerate(units):
            todo = [batches[k] for k in unit]
            runs = {"reference": lambda: reference.update({r["id"]: reference_ifd(engine, r) for b in todo for r in b}),
                    "stage": lambda: [stage.update({o["id"]: o["ifd"] for o in scorer.process(b)}) for b in todo],
                    "stage_no_prefix": lambda: [no_prefix.update({o["id"]: o["ifd"] for o in plain.process(b)})
                                                for b in todo],
                    "stage_bf16": lambda: [stage_bf16.update({o["id"]: o["ifd"] for o in bf16.process(b)})
                                           for b in todo],
                    "reference_bf16": lambda: reference_bf16.update(
                        {r["id"]: reference_ifd(bf16.engine, r) for b in todo for r in b}),
                    f"stage_{args.workers}x1": lambda: [workers.update(d) for d in pool.map(_process_batch, todo, 1)]}
            order = names if (u + repeat) % 2 == 0 else names[::-1]  # alternate who goes first
            for name in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                runs[name]()
                for k in unit:
                    walls[name][k].append((time.perf_counter() - start) / len(unit))
                cpu[name] += time.process_time() - start_cpu
            load_samples.append(os.getloadavg()[0])
            print(f"repeat {repeat + 1}/{args.repeats}, unit {u + 1}/{len(units)}: "
                  + ", ".join(f"{n} {walls[n][unit[0]][-1] * len(unit):.1f}s" for n in names)
                  + f"; load {load_samples[-1]:.1f}", file=sys.stderr, flush=True)
    if pool is not None:
        pool.close()
    load_after = os.getloadavg()

    # Each batch's least-disturbed time (the minimum over repeats, as timeit does), summed; and all of it.
    best = {n: sum(min(times) for times in walls[n]) for n in names}
    total = {n: sum(sum(times) for times in walls[n]) / args.repeats for n in names}

    def figures(name: str) -> dict:
        return {"best_s": round(best[name], 2), "mean_s": round(total[name], 2),
                "cpu_s": round(cpu[name] / args.repeats, 2) if not name.endswith("x1") else None,  # workers: not ours
                "records_per_s": round(len(records) / best[name], 4), "tokens_per_s": round(tokens / best[name], 1),
                "records_per_s_mean": round(len(records) / total[name], 4),
                "tokens_per_s_mean": round(tokens / total[name], 1)}

    result = {
        "records": len(records), "tokens_scored": tokens, "threads": args.threads, "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size, "max_padding": args.max_padding, "repeats": args.repeats,
        **{name: figures(name) for name in names},
        "speedup": round(best["reference"] / best["stage"], 2),
        "speedup_mean": round(total["reference"] / total["stage"], 2),
        **({"speedup_no_prefix": round(best["reference"] / best["stage_no_prefix"], 2)} if args.no_prefix else {}),
        **({f"speedup_{args.workers}x1": round(best["reference"] / best[f"stage_{args.workers}x1"], 2),
            f"max_abs_ifd_difference_{args.workers}x1": max(abs(reference[i] - workers[i]) for i in reference)}
           if args.workers else {}),
        **(bf16_figures(reference, stage_bf16, reference_bf16, best, total, walls, cpu) if args.bf16 else {}),
        "median_batch_speedup": round(statistics.median(
            r / s for rs, ss in zip(walls["reference"], walls["stage"]) for r, s in zip(rs, ss)), 2),
        "cpu_time_speedup": round(cpu["reference"] / cpu["stage"], 2),
        "max_abs_ifd_difference": max(abs(reference[i] - stage[i]) for i in reference),
        "per_batch_s": {n: [[round(t, 2) for t in times] for times in walls[n]] for n in names},
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "load_average_1m": {"min": round(min(load_samples), 2), "median": round(statistics.median(load_samples), 2),
                            "max": round(max(load_samples), 2), "samples": len(load_samples)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "command": "python benchmarks/ifd_throughput.py " + " ".join(sys.argv[1:]),
        "wall_s": round(time.time() - started, 1),
        "run": "one run of this script on a machine shared with other work; see load_average_1m",
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
