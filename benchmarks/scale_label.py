"""The label stage at scale, clean and under faults, against the openai engine alone in one process.

Everything runs in one invocation, on one machine, against `tests/openai_server.py` started in a
process of its own; the stage runs as a user runs it, `themis-ray label --config ...` (local Ray,
one actor of the openai engine, batches of 64), reading a `respond` stage of N rows (~600 characters
each, in parts of 1,000 rows) and writing `label`.

1. scale: N = 10k, 100k, 300k, fault-free: records/s of the stage (its manifest's wall time) and the
   peak RSS of the driver process, against the engine alone (one `generate` call over 20k records,
   the same client with the same prompts, no Ray) in the same run, before and after the stage runs:
   the faster of the two is the peer. Goals: driver peak grows by at
   most 150 MB from 10k to 300k; records/s at 300k at least 0.9x the engine alone. With `--actors N`
   the stage's pool runs N actors and the peer runs in N processes at once (like for like).
2. faults: 800 records (`--faults-records`), 0.2 s per answer, at most 16 at once (limit 80/s), with
   500 5%, malformed 200 bodies 2%, 429 10% (Retry-After), hangs 2% (5 s), score-less answers 5%:
   labelled share, records/s against the server's arithmetic ceiling under that mix (`fault_ceiling`),
   and answers paid for that the stage did not ask for (server-answered minus the attempts the stage
   recorded for the row; re-asking a score-less answer is the policy, not a duplicate).
3. latency: 0.05, 0.2 and 1 s per answer, at most 16 at once: stage vs the engine alone vs the
   server's limit (16 / latency).

    python benchmarks/scale_label.py [--sizes 10000,100000,300000] [--actors 1] [--scale-only | --faults-only] [--faults-records 800] [--out benchmarks/results/scale_label.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import yaml

from _endpoint import THEMIS, Endpoint, digest, engine_alone, engine_alone_processes, machine, run_measured, write_json

from themis_ray import judging
from themis_ray.executor.sink import StageSink
from themis_ray.schema import REJECT
from themis_ray.store import StageResult, StageStore

PART = 1000
FILLER = ("Adding a number to itself doubles it, so the sum is twice the number; written out step by step, "
          "the tens and the units are added apart and the carry is kept. ")


def responses(n: int, offset: int = 0):
    for start in range(offset, offset + n, PART):
        rows = [{"id": f"r{i:07d}", "instruction_id": f"i{i:07d}", "instruction": f"What is {i} + {i}? Show the steps.",
                 "scenario": "open_qa", "reference": None, "responder": "bench",
                 "response": f"{i} + {i} = {2 * i}. " + FILLER * 3} for i in range(start, min(offset + n, start + PART))]
        yield pa.Table.from_pylist(rows).append_column(REJECT, pa.nulls(len(rows), pa.string()))


def respond_stage(run_dir: Path, n: int) -> None:
    store = StageStore(str(run_dir), "respond")
    store.begin({"bench": n}, force=True)
    for table in responses(n):
        StageSink(store.uri, table.schema).write([table], None)
    store.commit(StageResult(rows_in=n), {"bench": n}, 0.0)


def conversations(n: int) -> list:
    return [judging.build_messages(judging.render_prompt(judging.request_from_row(row)))
            for table in responses(n, offset=10_000_000) for row in table.to_pylist()]


def label_run(folder: Path, n: int, endpoint: Endpoint, concurrency: int, batch_size: int = 64, actors: int = 1) -> dict:
    run_dir = folder / f"run-{n}-{time.time_ns()}"
    respond_stage(run_dir, n)
    config = run_dir / "label.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(run_dir), "ray": {"num_cpus": 2}, "label": {
        "engine": {"kind": "openai", "model": "teacher", "base_url": endpoint.base_url,
                   "max_concurrency": concurrency, "timeout_s": 30.0, "max_retries": 8},
        "sampling": {"max_tokens": 32, "logprobs": 0}, "score_by": "text", "prefill_score": False,
        "max_attempts": 2,
        "pool": {"num_cpus": 0, "min_size": actors, "max_size": actors, "batch_size": batch_size}}}))
    before = endpoint.paid()  # earlier runs on this server asked some of the same prompts
    measured = run_measured([THEMIS, "label", "--config", str(config)])
    store = StageStore(str(run_dir), "label")
    manifest = store.manifest()
    out = {"records": n, "labelled": manifest["rows_out"], "rejected": manifest["rows_rejected"],
           "stage_wall_s": manifest["wall_s"], "records_per_s": round(n / manifest["wall_s"], 2), **measured}
    # Paid for beyond the stage's own attempts: answers the stage did not record asking for.
    rejects = store.read_rejects()
    rows = [*store.read(columns=["prompt", "attempts"]).to_pylist(),
            *(rejects.select(["prompt", "attempts"]).to_pylist() if rejects.num_rows else [])]
    asked = {digest(r["prompt"]): r["attempts"] or 0 for r in rows if r["prompt"]}
    paid = endpoint.paid() - before  # the server's log: every answer it gave during this run
    out["paid_beyond_attempts"] = sum(max(0, paid[key] - attempts) for key, attempts in asked.items())
    return out


# The peers' fault mix, drawn in the test server's order: 500, malformed body, 429 (Retry-After), hang
# (then 500), score-less answer; each draw only among the requests the ones before it left.
FAULTS = {"fail_rate": 0.05, "malformed_rate": 0.02, "rate_limit_rate": 0.10, "hang_rate": 0.02, "garbage_rate": 0.05}
FAULT_LATENCY_S, FAULT_CAP, HANG_S, RETRY_AFTER_S = 0.2, 16, 5.0, 0.5


def fault_ceiling() -> dict:
    """The most records/s any client gets from the faulty server: it serves `FAULT_CAP` requests at once,
    each holding its slot for the latency (a hang for `HANG_S` more), and a record needs one answer
    with a score, so records/s <= (cap / mean slot-seconds per request) x (share of scored answers)."""
    left, share = 1.0, {}
    for kind in ("fail_rate", "malformed_rate", "rate_limit_rate", "hang_rate", "garbage_rate"):
        share[kind], left = left * FAULTS[kind], left * (1 - FAULTS[kind])
    slot_s = FAULT_LATENCY_S + share["hang_rate"] * HANG_S
    requests_per_s = FAULT_CAP / slot_s
    return {"scored_share": round(left, 4), "mean_slot_s": round(slot_s, 4),
            "server_requests_per_s": round(requests_per_s, 1), "records_per_s": round(requests_per_s * left, 1)}


def faults_run(folder: Path, n: int) -> dict:
    """`n` records through the stage against the faulty server, beside its arithmetic ceiling."""
    endpoint = Endpoint(folder, latency_s=FAULT_LATENCY_S, cap=FAULT_CAP, retry_after_s=RETRY_AFTER_S, hang_s=HANG_S,
                        **FAULTS)
    try:
        out = label_run(folder, n, endpoint, concurrency=FAULT_CAP)
    finally:
        endpoint.close()
    ceiling = fault_ceiling()
    out.update(server_limit_records_per_s=FAULT_CAP / FAULT_LATENCY_S, ceiling=ceiling,
               vs_ceiling=round(out["records_per_s"] / ceiling["records_per_s"], 3),
               labelled_share=round(out["labelled"] / n, 4))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,300000")
    parser.add_argument("--alone", type=int, default=20000, help="records for the engine-alone peer")
    parser.add_argument("--actors", type=int, default=1,
                        help="the stage's pool size in part 1; the peer then runs in as many processes")
    parser.add_argument("--scale-only", action="store_true", help="only part 1 (no faults, no latency sweep)")
    parser.add_argument("--faults-only", action="store_true", help="only part 2")
    parser.add_argument("--faults-records", type=int, default=800, help="records in part 2")
    parser.add_argument("--out", default="benchmarks/results/scale_label.json")
    args = parser.parse_args()
    doc: dict = {"command": "python benchmarks/scale_label.py " + " ".join(sys.argv[1:]), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="scale-label-") as tmp:
        folder = Path(tmp)
        if args.faults_only:
            doc["faults"] = faults_run(folder, args.faults_records)
            write_json(Path(args.out), doc)
            return
        # 1. scale, fault-free
        endpoint = Endpoint(folder, latency_s=0.02)
        try:
            # The peer runs before and after the stage runs, and the faster of the two is the figure
            # the stage is held against: on a shared machine one measurement of it can be slowed.
            peer = conversations(args.alone)

            def alone() -> dict:
                return engine_alone_processes(endpoint.base_url, peer, 32, 32, args.actors)

            scale = {"latency_s": 0.02, "engine_max_concurrency": 32, "actors": args.actors,
                     "engine_alone_before": alone()}
            for n in map(int, args.sizes.split(",")):
                scale[str(n)] = label_run(folder, n, endpoint, concurrency=32, actors=args.actors)
                print(json.dumps({n: scale[str(n)]}), flush=True)
            scale["engine_alone_after"] = alone()
        finally:
            endpoint.close()
        scale["engine_alone"] = max(scale["engine_alone_before"], scale["engine_alone_after"],
                                    key=lambda m: m["records_per_s"])
        sizes = [k for k in scale if k.isdigit()]
        for n in sizes:
            scale[n]["vs_engine_alone"] = round(scale[n]["records_per_s"] / scale["engine_alone"]["records_per_s"], 3)
        scale["driver_rss_growth_mb"] = round(scale[sizes[-1]]["driver_peak_rss_mb"] - scale[sizes[0]]["driver_peak_rss_mb"], 1)
        doc["scale"] = scale
        if args.scale_only:
            write_json(Path(args.out), doc)
            return
        # 2. faults
        doc["faults"] = faults_run(folder, args.faults_records)
        print(json.dumps({"faults": doc["faults"]}), flush=True)
        # 3. latency sweep
        sweep = {}
        for latency in (0.05, 0.2, 1.0):
            limit = 16 / latency
            n = int(min(20 * limit, 6000))
            endpoint = Endpoint(folder, latency_s=latency, cap=16)
            try:
                alone = engine_alone(endpoint.base_url, conversations(n), 16, 32)
                stage = label_run(folder, n, endpoint, concurrency=16)
            finally:
                endpoint.close()
            sweep[str(latency)] = {"server_limit_records_per_s": limit, "engine_alone": alone, "stage": stage,
                                   "stage_vs_engine_alone": round(stage["records_per_s"] / alone["records_per_s"], 3),
                                   "stage_vs_limit": round(stage["records_per_s"] / limit, 3),
                                   "engine_alone_vs_limit": round(alone["records_per_s"] / limit, 3)}
            print(json.dumps({latency: sweep[str(latency)]}), flush=True)
        doc["latency"] = sweep
    doc["machine"]["load_avg_1m_end"] = machine()["load_avg_1m"]
    write_json(Path(args.out), doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
