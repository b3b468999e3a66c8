"""`themis-ray judge` over a JSONL file against the openai engine alone in one process.

Both ask `tests/openai_server.py` (a process of its own; 0.05 s and 0.2 s per answer, at most 16 at
once, so at most 320 and 80 records/s) the same evaluation prompts. The job runs as a user runs it,
`themis-ray judge --config configs/quickstart.yaml input=... output=... judge.engine.kind=openai ...`
(local Ray, one actor, batches of 64); its records/s is over the job's own wall time (manifest:
reading, mapping, judging, writing), the peer's over one `generate` call. Goal: at least 0.9x.

    python benchmarks/judge_throughput.py [--out benchmarks/results/judge_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _endpoint import ROOT, THEMIS, Endpoint, engine_alone, machine, run_measured, write_json

from themis_ray import judging
from themis_ray.store import StageStore


def records(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} + {i}? Show the steps.", "completion": f"{i} + {i} = {2 * i}.",
             "source": "bench"} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/judge_throughput.json")
    args = parser.parse_args()
    doc: dict = {"command": "python benchmarks/judge_throughput.py " + " ".join(sys.argv[1:]), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="judge-bench-") as tmp:
        folder = Path(tmp)
        for latency in (0.05, 0.2):
            limit = 16 / latency
            n = int(min(25 * limit, 6000))
            data = folder / f"data-{latency}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in records(n)))
            conversations = [judging.build_messages(judging.render_prompt(judging.request_from_row(
                {"instruction": r["prompt"], "response": r["completion"], "scenario": "open_qa"})))
                for r in records(n)]
            endpoint = Endpoint(folder, latency_s=latency, cap=16)
            output = folder / f"out-{latency}-{time.time_ns()}"
            try:
                alone = engine_alone(endpoint.base_url, conversations, 16, 32)
                measured = run_measured([
                    THEMIS, "judge", "--config", str(ROOT / "configs" / "quickstart.yaml"), f"input={data}",
                    f"output={output}", "judge.engine.kind=openai", f"judge.engine.base_url={endpoint.base_url}",
                    "judge.engine.model=teacher", "judge.engine.max_concurrency=16", "judge.scenario=open_qa",
                    "judge.columns.instruction=prompt", "judge.columns.response=completion", "judge.pool.num_cpus=0",
                    "judge.pool.batch_size=64", "judge.sampling.logprobs=0", "judge.sampling.max_tokens=32"])
            finally:
                endpoint.close()
            manifest = StageStore.at(str(output)).manifest()
            job = {"records": n, "judged": manifest["rows_out"], "rejected": manifest["rows_rejected"],
                   "job_wall_s": manifest["wall_s"], "records_per_s": round(n / manifest["wall_s"], 2), **measured}
            doc[str(latency)] = {"server_limit_records_per_s": limit, "engine_alone": alone, "judge_job": job,
                                 "job_vs_engine_alone": round(job["records_per_s"] / alone["records_per_s"], 3),
                                 "job_vs_limit": round(job["records_per_s"] / limit, 3)}
            print(json.dumps({latency: doc[str(latency)]}), flush=True)
    doc["machine"]["load_avg_1m_end"] = machine()["load_avg_1m"]
    write_json(Path(args.out), doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
