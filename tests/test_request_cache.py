"""The request cache, and the openai engine's manners, against the real local OpenAI-compatible server.

Without Ray: an engine with a cache folder asks the endpoint once per distinct request, across
engines and runs; a changed prompt, model or sampling misses; a failed request is not kept. The
engine honours Retry-After (timed on the server's clock), halves its concurrency on a burst of 429s
and grows it back, and the shared budget's reservations keep requests per minute.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import OpenAIServer  # noqa: E402

from themis_ray.config import CacheConfig, EngineConfig, SamplingConfig  # noqa: E402
from themis_ray.engines import build_engine  # noqa: E402
from themis_ray.engines.cache import RequestCache, cache_folder, request_key, with_cache  # noqa: E402
from themis_ray.engines.openai_engine import AdaptiveSlots, Budget  # noqa: E402


def _engine(server: OpenAIServer, cache=None, **kw):
    cfg = EngineConfig(kind="openai", model="teacher", base_url=server.base_url, cache=str(cache) if cache else None,
                       **{"max_retries": 3, "timeout_s": 5, **kw})
    return build_engine(cfg)


def _conv(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_entries_round_trip_and_keys_cover_what_decides_an_answer(tmp_path):
    cache = RequestCache(str(tmp_path / "c"))
    body = {"model": "m", "messages": _conv("q"), "max_tokens": 8, "temperature": 0.0, "seed": 0}
    key = request_key("openai", body)
    assert cache.get(key) is None
    cache.put(key, {"text": "a", "prompt_tokens": 1})
    assert cache.get(key) == {"text": "a", "prompt_tokens": 1}
    assert not list((tmp_path / "c").rglob("*.partial"))  # written under a temporary name, then renamed
    others = [request_key("hf", body), request_key("openai", {**body, "model": "n"}),
              request_key("openai", {**body, "messages": _conv("r")}), request_key("openai", {**body, "seed": 1}),
              request_key("openai", {**body, "max_tokens": 9})]
    assert len({key, *others}) == 6
    (tmp_path / "c" / key[:2] / f"{key}.json").write_text("{cut sho")  # unreadable: a miss, not an error
    assert cache.get(key) is None


def test_entries_on_object_storage(s3_server):
    cache = RequestCache(f"{s3_server}/runs/cached/_cache/requests")
    key = request_key("openai", {"model": "m", "messages": _conv("q")})
    assert cache.get(key) is None  # a missing object is a miss, not an error
    cache.put(key, {"text": "a", "tokens": None})
    assert RequestCache(f"{s3_server}/runs/cached/_cache/requests").get(key) == {"text": "a", "tokens": None}


def test_cache_folder_and_with_cache_follow_the_config(tmp_path):
    assert cache_folder(CacheConfig(), str(tmp_path)) == str(tmp_path / "_cache" / "requests")
    assert cache_folder(CacheConfig(path="s3://b/c"), str(tmp_path)) == "s3://b/c"
    assert cache_folder(CacheConfig(enabled=False), str(tmp_path)) is None
    assert with_cache(EngineConfig(), "x").cache == "x"
    assert with_cache(EngineConfig(cache="mine"), "x").cache == "mine"  # set by the user: kept


def test_a_second_run_asks_nothing_and_a_change_misses(tmp_path):
    questions = [_conv(f"What is {i} + {i}?") for i in range(6)]
    greedy = SamplingConfig(max_tokens=16)
    with OpenAIServer() as server:
        first = _engine(server, tmp_path)
        answers = first.generate(questions, greedy)
        first.close()
        assert server.total_requests == 6 and first.usage.extra["cache_hits"] == 0
        again = _engine(server, tmp_path)  # another engine (another actor, a later run): the same folder
        assert [c.text for c in again.generate(questions, greedy)] == [c.text for c in answers]
        assert server.total_requests == 6 and again.usage.extra["cache_hits"] == 6
        again.generate([_conv("What is 0 + 0? Show your work.")], greedy)  # a changed prompt
        assert server.total_requests == 7
        again.generate(questions[:2], SamplingConfig(max_tokens=16, temperature=0.7, seed=1))  # changed sampling
        assert server.total_requests == 9
        again.close()
        uncached = _engine(server)  # no cache folder: every request is sent
        uncached.generate(questions[:1], greedy)
        uncached.close()
        assert server.total_requests == 10


def test_a_failed_request_is_not_kept(tmp_path):
    with OpenAIServer(fail_after=0) as down:
        engine = _engine(down, tmp_path, max_retries=0)
        assert engine.generate([_conv("q")], SamplingConfig())[0].error
        engine.close()
    with OpenAIServer() as up:
        engine = _engine(up, tmp_path)
        assert engine.generate([_conv("q")], SamplingConfig())[0].error is None
        engine.close()
        assert up.total_requests == 1  # asked again: the failure was not an answer


def test_retry_after_is_honoured_on_the_servers_clock():
    with OpenAIServer(rate_limit_first=2, retry_after_s=0.6) as server:
        engine = _engine(server)
        out = engine.generate([_conv("patience")], SamplingConfig())
        engine.close()
    assert out[0].error is None
    arrivals = [(t, status) for t, _, status in server.arrivals]
    assert [status for _, status in arrivals] == [429, 429, 200]
    gaps = [later - earlier for (earlier, _), (later, _) in zip(arrivals, arrivals[1:])]
    assert all(gap >= 0.6 for gap in gaps), gaps  # each retry waited at least its Retry-After
    assert engine.usage.extra["rate_limited"] == 2


def test_slots_halve_once_per_burst_of_429s_tolerate_a_stray_one_and_grow_back():
    async def scenario():
        slots = AdaptiveSlots(8)
        epochs = [await slots.acquire() for _ in range(8)]
        assert slots.in_flight == 8 and slots.limit == 8
        for epoch in epochs[:4]:  # four 429s of one burst: halved once (at the second, 8 / 4)
            slots.release(epoch, rate_limited=True)
        assert slots.limit == 4
        for epoch in epochs[4:]:  # the rest of the burst answered
            slots.release(epoch)
        assert slots.in_flight == 0
        for _ in range(2):  # two 429s among requests sent under the new limit halve it again
            slots.release(await slots.acquire(), rate_limited=True)
        assert slots.limit == 2
        for _ in range(2 + 3 + 4 + 5 + 6):  # a window of `limit` answers below the threshold grows it by one
            slots.release(await slots.acquire())
        assert slots.limit == 7
        for limited in [True] + [False] * 6:  # one 429 in a window of 7 is below it: grown to 8 still
            slots.release(await slots.acquire(), rate_limited=limited)
        assert slots.limit == 8
        for limited in (False, True, False, True):  # two in the next window: halved
            slots.release(await slots.acquire(), rate_limited=limited)
        assert slots.limit == 4

    asyncio.run(scenario())


def test_slots_settle_near_the_endpoint_capacity_under_random_429s_and_back_off_when_over_it():
    """A simulated endpoint: `capacity` requests at once; above it, the excess gets 429. A 10% share of
    random 429s besides keeps the limit near the maximum; an endpoint that takes 4 brings it down."""
    rng = random.Random(0)

    async def run(capacity: int, noise: float) -> list[int]:
        slots, limits = AdaptiveSlots(16), []
        for _ in range(400):  # rounds: fill the limit, answer everything sent
            epochs = [await slots.acquire() for _ in range(slots.limit)]
            for k, epoch in enumerate(epochs):
                slots.release(epoch, rate_limited=k >= capacity or rng.random() < noise)
            limits.append(slots.limit)
        return limits[100:]

    noisy = asyncio.run(run(capacity=64, noise=0.10))
    assert sum(noisy) / len(noisy) > 10  # halving on every 429 would hover near 4
    crowded = asyncio.run(run(capacity=4, noise=0.0))
    assert max(crowded) <= 6 and sum(crowded) / len(crowded) >= 3


def test_budget_reservations_queue_callers_and_a_pause_holds_them_all():
    now = [0.0]
    budget = Budget(requests_per_minute=60, tokens_per_minute=None, clock=lambda: now[0])  # 1/s, burst of 60
    assert [budget.reserve(1, 0) for _ in range(60)] == [0.0] * 60
    assert [budget.reserve(1, 0) for _ in range(3)] == pytest.approx([1.0, 2.0, 3.0])  # queued in order
    now[0] = 10.0  # 10 s of refill pays the 3 s of debt and leaves 7 requests' worth
    assert [budget.reserve(1, 0) for _ in range(7)] == [0.0] * 7
    assert budget.reserve(1, 0) == pytest.approx(1.0)
    budget.pause(5.0)
    assert budget.reserve(0, 0) == pytest.approx(5.0)
    tokens = Budget(None, tokens_per_minute=600, clock=lambda: now[0])  # 10 tokens/s
    assert tokens.reserve(1, 600) == 0.0 and tokens.reserve(1, 100) == pytest.approx(10.0)


@pytest.mark.integration
def test_requests_per_minute_hold_across_actors(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Asker:
        def __init__(self, cfg):
            from themis_ray.engines import build_engine

            self.engine = build_engine(cfg)

        def ask(self, tag: str, n: int) -> list:
            from themis_ray.config import SamplingConfig

            asked = [[{"role": "user", "content": f"{tag} {i}"}] for i in range(n)]
            return [c.error for c in self.engine.generate(asked, SamplingConfig())]

    with OpenAIServer() as server:
        # 60 a minute for the whole cluster: a burst of 60, then one a second. Two actors asking 66
        # together wait about 6 s for the last 6; with a budget of their own (60 each) neither waits.
        cfg = EngineConfig(kind="openai", model="teacher", base_url=server.base_url, requests_per_minute=60)
        actors = [Asker.remote(cfg) for _ in range(2)]
        errors = ray.get([actors[0].ask.remote("a", 33), actors[1].ask.remote("b", 33)])
    assert errors == [[None] * 33, [None] * 33]
    arrivals = sorted(t for t, _, _ in server.arrivals)
    assert len(arrivals) == 66
    assert arrivals[-1] - arrivals[0] >= 4.5, arrivals[-1] - arrivals[0]  # on the server's clock


@pytest.mark.integration
def test_respond_and_evaluate_endpoints_pay_once_across_a_forced_rerun(ray_local, tmp_path):
    """respond's responders and evaluate's endpoint judge keep their answers in the run's request cache:
    each stage run again from scratch (`--force`) sends the endpoint nothing."""
    import pyarrow as pa

    from stage_io import finished_stage

    from themis_ray import judging
    from themis_ray.config import load
    from themis_ray.pipeline import run_stage

    run_dir = tmp_path / "run"
    questions = [{"id": f"q{i}", "instruction": f"What is {i} + {i}?", "scenario": "math_qa", "reference": None}
                 for i in range(4)]
    finished_stage(run_dir, "classify", pa.Table.from_pylist(questions))
    curated = []
    for i in range(3):
        request = judging.JudgeRequest(instruction=f"What is {i} + {i}?", response=str(2 * i), scenario="open_qa")
        curated.append({"id": f"v{i}", "scenario": "open_qa", "mode": "single", "instruction": request.instruction,
                        "response": request.response, "reference": None, "score": 5.0, "split": "validation",
                        "prompt": judging.render_prompt(request)})
    finished_stage(run_dir, "curate", pa.Table.from_pylist(curated))
    finished_stage(run_dir, "train", pa.table({"id": pa.array([], pa.string())}))
    with OpenAIServer() as server:
        endpoint = f"{{kind: openai, model: teacher, base_url: '{server.base_url}'}}"
        cfg = load(None, [
            f"run_dir={run_dir}", "respond.pool.num_cpus=0", "evaluate.pool.num_cpus=0",
            f"respond.responders=[{{name: a, engine: {endpoint}}}, {{name: b, engine: {endpoint}, "
            "system_prompt: Be brief.}]",
            f"evaluate.judges=[{{name: remote, engine: {endpoint}}}]", "evaluate.benchmarks=[validation]",
            "evaluate.bootstrap=20",
        ])
        first = {stage: run_stage(cfg, stage, force=True)["rows_out"] for stage in ("respond", "evaluate")}
        assert first == {"respond": 8, "evaluate": 3} and server.total_requests == 11
        again = {stage: run_stage(cfg, stage, force=True)["rows_out"] for stage in ("respond", "evaluate")}
        assert again == first and server.total_requests == 11  # every answer read back from the cache
    assert len(list((run_dir / "_cache" / "requests").glob("*/*.json"))) == 11
