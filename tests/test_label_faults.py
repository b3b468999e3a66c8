"""The label stage against a faulty OpenAI-compatible endpoint, on a real local Ray.

Nothing is lost or duplicated whatever the endpoint does (429 with Retry-After, 500, hangs past the
client's timeout, malformed bodies, unparsable judge text); a run whose driver died resumes without
re-sending a record it had written or rejected; the API key reaches no file and no log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import OpenAIServer, judge_answer, prompt_key  # noqa: E402

from themis_ray.config import PipelineConfig  # noqa: E402
from themis_ray.schema import REJECT, REJECT_CODE  # noqa: E402
from stage_io import finished_stage, run_one  # noqa: E402

from themis_ray.store import StageStore  # noqa: E402

pytestmark = pytest.mark.integration

KEY_ENV = "THEMIS_TEST_LABEL_KEY"
SECRET = f"sk-themis-test-{uuid.uuid4().hex}"  # unique per run, so a hit can only come from this run
UNGRADABLE = "UNGRADABLE"  # records whose instruction says this always get an answer without a score


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    old_key = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = SECRET  # before Ray starts, so its workers inherit it like a real deployment
    temp_dir = tempfile.mkdtemp(prefix="tl-", dir="/tmp")  # short: Ray's socket paths live under it
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
    try:
        yield Path(temp_dir)
    finally:
        ray.shutdown()
        if old_key is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = old_key


def records(n: int, ungradable: int = 0, empty: int = 0) -> pa.Table:
    rows = [{"id": f"r{i:03d}", "instruction": f"What is {i} + {i}?", "scenario": "open_qa", "reference": None,
             "response": f"{i} + {i} = {2 * i}."} for i in range(n)]
    for row in rows[:ungradable]:
        row["instruction"] = f"{UNGRADABLE}: {row['instruction']}"
    for row in rows[ungradable:ungradable + empty]:
        row["response"] = "   "  # nothing to judge: rejected before any request
    return pa.Table.from_pylist(rows)


def answer(messages) -> str:
    return "I will not grade this." if UNGRADABLE in prompt_key(messages) else judge_answer(messages)


def make_cfg(server: OpenAIServer, run_dir, batch_size: int = 8, max_size: int = 2, **engine):
    engine = {"kind": "openai", "model": "teacher", "base_url": server.base_url, "api_key_env": KEY_ENV,
              "max_concurrency": 8, "timeout_s": 5.0, "max_retries": 6, **engine}
    return OmegaConf.merge(OmegaConf.structured(PipelineConfig), {"run_dir": str(run_dir), "label": {
        "engine": engine, "sampling": {"max_tokens": 64, "logprobs": 0}, "score_by": "text",
        "prefill_score": False, "max_attempts": 2,
        "pool": {"num_cpus": 0, "min_size": 1, "max_size": max_size, "batch_size": batch_size}}})


def run_label(cfg, table: pa.Table, commit: bool = True):
    """The label stage over `table` as its finished respond stage: (result, manifest, store)."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    if StageStore(cfg.run_dir, "respond").manifest() is None:  # a re-run keeps its input as it was
        finished_stage(cfg.run_dir, "respond", table)
    manifest, result, store = run_one(cfg, "label", commit=commit)
    return result, manifest, store


def test_faults_lose_and_duplicate_no_record(local_ray, tmp_path):
    n, ungradable, empty = 80, 3, 2
    table = records(n, ungradable, empty)
    # About 20% of requests faulted, 4% of each kind; a hang outlasts the client's timeout.
    with OpenAIServer(latency_s=0.02, answer=answer, fail_rate=0.04, malformed_rate=0.04, rate_limit_rate=0.04,
                      retry_after_s=0.3, hang_rate=0.04, hang_s=4.0, garbage_rate=0.04, seed=7) as server:
        cfg = make_cfg(server, tmp_path, timeout_s=2.0)
        result, manifest, store = run_label(cfg, table)
    for kind in ("error", "malformed", "rate_limited", "hang", "garbage"):
        assert server.faults[kind] > 0, f"no {kind} fault was injected: {dict(server.faults)}"

    # Exact accounting: every input row is exactly one output row, labelled or rejected with its reason.
    assert manifest["rows_in"] == n == manifest["rows_out"] + manifest["rows_rejected"]
    kept, rejects = store.read(), store.read_rejects()
    ids = kept["response_id"].to_pylist() + rejects["response_id"].to_pylist()
    assert sorted(ids) == sorted(table["id"].to_pylist())  # none lost, none twice
    assert len(set(kept["id"].to_pylist() + rejects["id"].to_pylist())) == n
    reasons = dict(zip(rejects["response_id"].to_pylist(), rejects[REJECT].to_pylist()))
    assert all(reasons.values()), reasons
    for i in range(ungradable):  # asked max_attempts times, then kept with the raw answer
        assert reasons[f"r{i:03d}"].startswith("unparsable evaluation"), reasons
    for i in range(ungradable, ungradable + empty):
        assert reasons[f"r{i:03d}"].startswith("bad record: response is empty"), reasons
    ungraded = rejects.filter(pc.equal(rejects[REJECT_CODE], "unparsable"))
    assert ungraded.num_rows == ungradable
    # The raw answer of the last attempt is kept: the record's own refusal, or an injected score-less one.
    assert set(ungraded["evaluation"].to_pylist()) <= {"I will not grade this.", server.garbage_text}
    assert set(ungraded["attempts"].to_pylist()) == {2}

    # Labelled rows: a score, and at least one answered request behind each.
    assert set(kept["score"].to_pylist()) == {4.0}
    for prompt, attempts in zip(kept["prompt"].to_pylist(), kept["attempts"].to_pylist()):
        assert server.answered[prompt] >= 1 and 1 <= attempts <= 2
    assert manifest["prompt_tokens"] > 0 and manifest["completion_tokens"] > 0


DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
from omegaconf import OmegaConf
from stage_io import run_one
from themis_ray.config import PipelineConfig
run_one(OmegaConf.merge(OmegaConf.structured(PipelineConfig), OmegaConf.load(sys.argv[2])), "label")
"""


def _settled(store: StageStore, server: OpenAIServer, quiet_s: float = 3.0, limit_s: float = 60.0) -> None:
    """Wait until nothing new reaches the server or the stage folder for `quiet_s`: the killed
    driver's actors are gone (Ray ends them with their owner)."""
    seen, since, deadline = None, time.time(), time.time() + limit_s
    while time.time() < deadline:
        now = (server.total_requests, tuple(store.written_files()), server.in_flight)
        if now != seen:
            seen, since = now, time.time()
        elif time.time() - since >= quiet_s and server.in_flight == 0:
            return
        time.sleep(0.2)
    raise AssertionError("the killed run's actors still write or ask after 60 s")


def test_a_killed_run_resumes_without_resending_written_records_or_rejects(local_ray, tmp_path):
    import ray

    n = 60
    table = records(n)
    # The endpoint goes down after 12 requests (records then end as rejects), and the driver is killed
    # with SIGKILL while the stage runs: once both kinds of part are on disk, before every row is.
    with OpenAIServer(latency_s=0.3, fail_after=12) as down:
        cfg = make_cfg(down, tmp_path, batch_size=4, max_size=1, max_concurrency=4, max_retries=1)
        finished_stage(cfg.run_dir, "respond", table)
        store = StageStore(cfg.run_dir, "label")
        config = tmp_path / "label.yaml"
        config.write_text(OmegaConf.to_yaml(cfg))
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        with open(tmp_path / "driver.log", "w") as log:
            driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(Path(__file__).parent), str(config)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 180
        while driver.poll() is None and time.time() < deadline:
            names = [p.rsplit("/", 2)[-2:] for p in store.written_files()]
            if any(folder == "_rejects" for folder, _ in names) and any(folder == "label" for folder, _ in names):
                break
            time.sleep(0.1)
        assert driver.poll() is None, "the first run ended before it could be killed:\n" + (
            tmp_path / "driver.log").read_text()[-3000:]
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        _settled(store, down)
    assert store.manifest() is None  # killed: never committed
    parts = [pq.read_table(p) for p in store.written_files()]  # what the killed run left
    written = [r for t in parts for r in t.to_pylist()]
    finished = {r["prompt"] for r in written if r.get(REJECT) is None}
    rejected = {r["response_id"]: r[REJECT] for r in written if r.get(REJECT) is not None}
    assert finished and rejected and len(finished) + len(rejected) < n, (len(finished), len(rejected))
    assert all(reason.startswith("engine error") for reason in rejected.values()), rejected

    # The same command again (same config, so the written parts are kept), the endpoint back up.
    with OpenAIServer(latency_s=0.02, port=int(down.base_url.rsplit(":", 1)[1].split("/")[0])) as up:
        assert make_cfg(up, tmp_path, batch_size=4, max_size=1, max_concurrency=4, max_retries=1) == cfg
        _, manifest, store = run_label(cfg, table)
    resent = {p for p in finished if up.requests[p]}
    assert not resent, f"{len(resent)} finished records were requested again"
    # A reject the killed run wrote is an answer too: kept with its reason, never asked again.
    kept, rejects = store.read(), store.read_rejects()
    asked_again = [r["prompt"] for r in kept.to_pylist() + rejects.to_pylist()
                   if r["response_id"] in rejected and up.requests[r["prompt"]]]
    assert not asked_again, f"{len(asked_again)} rejected records were requested again"
    assert dict(zip(rejects["response_id"].to_pylist(), rejects[REJECT].to_pylist())) == rejected
    assert len(up.answered) == n - len(finished) - len(rejected)  # every record not written before, only those
    assert set(up.answered.values()) == {1}
    assert manifest["rows_in"] == n == manifest["rows_out"] + manifest["rows_rejected"]
    assert sorted(kept["response_id"].to_pylist() + rejects["response_id"].to_pylist()) == sorted(table["id"].to_pylist())


def test_api_key_reaches_no_file_and_no_log(local_ray, tmp_path, capfd):
    n = 12
    table = records(n)
    with OpenAIServer(latency_s=0.01, api_key=SECRET, fail_rate=0.2, malformed_rate=0.1, seed=3) as server:
        cfg = make_cfg(server, tmp_path / "ok", max_retries=8, usd_per_1k_prompt_tokens=2.5,
                       usd_per_1k_completion_tokens=10.0)
        _, manifest, store = run_label(cfg, table)
    assert server.unauthorized == 0 and len(server.answered) == n  # the key was sent, and accepted
    assert manifest["rows_out"] == n
    kept = store.read()
    expected = sum((p * 2.5 + c * 10.0) / 1000 for p, c in
                   zip(kept["prompt_tokens"].to_pylist(), kept["completion_tokens"].to_pylist()))
    assert manifest["cost_usd"] == pytest.approx(expected, abs=1e-6) and manifest["cost_usd"] > 0
    assert kept["cost_usd"].to_pylist() == pytest.approx(
        [(p * 2.5 + c * 10.0) / 1000 for p, c in zip(kept["prompt_tokens"].to_pylist(),
                                                     kept["completion_tokens"].to_pylist())])

    # An endpoint that refuses the key: every record a reject whose reason names the error, not the key.
    with OpenAIServer(api_key="sk-some-other-key") as refusing:
        cfg = make_cfg(refusing, tmp_path / "refused", max_retries=1)
        _, refused, refused_store = run_label(cfg, table)
    assert refused["rows_rejected"] == n and refusing.unauthorized >= n
    reasons = refused_store.read_rejects()[REJECT].to_pylist()
    assert all("AuthenticationError (HTTP 401)" in r for r in reasons), reasons[:3]

    time.sleep(1)  # let the workers' log lines reach the driver and the session's files
    captured = capfd.readouterr()
    secret = SECRET.encode()
    leaks = [str(p) for p in [*tmp_path.rglob("*"), *local_ray.rglob("*")] if _contains(p, secret)]
    assert not leaks, f"the API key was written to {leaks}"
    assert SECRET not in captured.out and SECRET not in captured.err
    assert any(tmp_path.rglob("_manifest.json")) and any(local_ray.rglob("*.log")), "nothing was grepped"


def _contains(path: Path, needle: bytes) -> bool:
    try:
        return path.is_file() and not path.is_socket() and needle in path.read_bytes()
    except OSError:  # a file Ray removed meanwhile
        return False


def pair_answer(messages) -> str:
    """A judge that prefers the response saying "carefully", and otherwise always says A (position bias)."""
    text = prompt_key(messages)
    if "Response A start" not in text:
        return judge_answer(messages)
    a = text.split("[Response A start]")[1].split("[Response A end]")[0]
    b = text.split("[Response B start]")[1].split("[Response B end]")[0]
    if "carefully" in a or "carefully" in b:
        return "[[A]] It is careful." if "carefully" in a else "[[B]] It is careful."
    return "[[A]] The first one."


def test_pairwise_rows_beside_pointwise_ones_with_exact_accounting(local_ray, tmp_path):
    rows = []
    for q in range(4):  # 4 responses each: consecutive pairs (0, 1), (1, 2), (2, 3); at most 3 per instruction
        for k, text in enumerate(["It is 4.", "Adding carefully, it is 4.", "Four.", "4"]):
            rows.append({"id": f"q{q}-{k}", "instruction_id": f"q{q}", "instruction": f"What is 2 + 2? ({q})",
                         "scenario": "open_qa", "reference": None, "responder": f"m{k}", "response": text})
    rows.append({"id": "lonely", "instruction_id": "q9", "instruction": "Alone?", "scenario": "open_qa",
                 "reference": None, "responder": "m0", "response": "Yes."})  # one response: no pair
    table = pa.Table.from_pylist(rows)
    with OpenAIServer(latency_s=0.01, answer=pair_answer, fail_rate=0.1, seed=5) as server:
        cfg = make_cfg(server, tmp_path, batch_size=4)
        cfg.label.pairwise, cfg.label.max_pairs_per_instruction = True, 3
        _, manifest, store = run_label(cfg, table)
    assert manifest["pairwise_pairs"] == 12
    assert manifest["rows_in"] == len(rows) + 12 == manifest["rows_out"] + manifest["rows_rejected"]
    kept = store.read().to_pylist()
    pointwise = [r for r in kept if r["mode"] != "pairwise"]
    pairs = [r for r in kept if r["mode"] == "pairwise"]
    assert sorted(r["response_id"] for r in pointwise) == sorted(r["id"] for r in rows)
    assert all(r["verdict"] is None and r["response_a"] is None for r in pointwise)
    assert len(pairs) == 12 and len({r["id"] for r in kept}) == len(kept)
    for r in pairs:
        careful_a, careful_b = "carefully" in r["response_a"], "carefully" in r["response_b"]
        # The careful answer wins in both orders; otherwise the judge's A in both orders is a flip: a tie.
        expected = "A" if careful_a else "B" if careful_b else "C"
        assert (r["verdict"], r["verdict_consistent"]) == (expected, careful_a or careful_b), r
        assert r["evaluation"].startswith("[[") and r["evaluation_swapped"].startswith("[[")
        assert r["score"] is None and r["prompt"].count("[Response A start]") == 1
    assert manifest["pairwise_consistent"] == sum(r["verdict_consistent"] for r in pairs) == 8  # (2, 3) ties


def test_rejects_retried_on_resume_and_a_second_run_pays_nothing(local_ray, tmp_path):
    import shutil

    n = 16
    table = records(n)
    # A run interrupted before its commit, its endpoint down after 6 answers: 6 labelled, 10 rejected.
    with OpenAIServer(fail_after=6) as down:
        cfg = make_cfg(down, tmp_path, batch_size=4, max_size=1, max_concurrency=1, max_retries=0)
        run_label(cfg, table, commit=False)
    port = int(down.base_url.rsplit(":", 1)[1].split("/")[0])
    cache = tmp_path / "_cache" / "requests"
    assert len(list(cache.rglob("*.json"))) == 6  # what was paid for is kept, failures are not

    # The same run resumed with retry_rejects (not part of the fingerprint): only the rejects are asked.
    with OpenAIServer(port=port) as up:
        cfg.label.retry_rejects = True
        _, manifest, store = run_label(cfg, table)
    assert up.total_requests == 10 and len(up.answered) == 10
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (n, 0)
    labelled = store.read()
    assert sorted(labelled["response_id"].to_pylist()) == sorted(table["id"].to_pylist())

    # The stage's output lost and run again: every answer comes from the cache, nothing is asked.
    shutil.rmtree(tmp_path / "label")
    with OpenAIServer(port=port) as again:
        _, manifest, store = run_label(cfg, table)
    assert again.total_requests == 0
    assert manifest["rows_out"] == n and store.read().sort_by("id").equals(labelled.sort_by("id"))

    # Another sampling is another request: every record is asked.
    with OpenAIServer(port=port) as changed:
        cfg.label.sampling.max_tokens = 65
        _, manifest, _ = run_label(cfg, table)
    assert changed.total_requests == n and manifest["rows_out"] == n
