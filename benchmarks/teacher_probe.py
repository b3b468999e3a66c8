"""Which embedded model is a teacher? Each grades five answers to one question (two right, a wrong
fact, an off-topic reply, an evasion) through the project's own evaluation prompt, score-only: the
expected score from the score distribution at the score position (one forward pass, `rationale:
false`), uncalibrated. A teacher worth learning from puts both right answers above all three bad ones.

Per model: the expected and argmax score of each answer, `separates` (min right > max bad), the
margin between them, seconds per answer (prompt ~450 tokens), load seconds and peak RSS.

    .venv/bin/python benchmarks/teacher_probe.py --out benchmarks/results/teacher_probe.json
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import time

from _endpoint import emit

from themis_ray import judging
from themis_ray.config import EngineConfig
from themis_ray.engines import build_engine

QUESTION = "What is the capital of Australia, and why was it chosen over Sydney and Melbourne?"
ANSWERS = {
    "right_1": "The capital is Canberra. It was chosen as a compromise between Sydney and Melbourne, the two "
               "largest cities, which both wanted to be capital; Canberra was purpose-built between them and "
               "became the seat of government in 1927.",
    "right_2": "Canberra. Sydney and Melbourne were rivals, so the 1901 constitution required a new capital in "
               "New South Wales at least 100 miles from Sydney; Canberra was the site selected in 1908.",
    "wrong_fact": "The capital of Australia is Sydney, because it is the largest and oldest city in the country.",
    "off_topic": "Kangaroos are marsupials that carry their young in a pouch and can hop at high speed.",
    "evasive": "I don't know.",
}
MODELS = ["qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]


def probe(model: str, dtype: str, threads: int, scale: judging.RatingScale) -> dict:
    start = time.time()
    engine = build_engine(EngineConfig(kind="hf", model=model, dtype=dtype, num_threads=threads, max_model_len=4096))
    load_s = time.time() - start
    results, seconds = {}, []
    for name, answer in ANSWERS.items():
        request = judging.JudgeRequest(instruction=QUESTION, scenario="open_qa", response=answer, scale=scale)
        messages = judging.build_messages(judging.render_prompt(request), prefill=True)
        start = time.time()
        logprobs = engine.choice_logprobs(messages, judging.choice_options("single", scale))
        seconds.append(time.time() - start)
        _, evaluation, distribution = judging.evaluation_from_choices(logprobs, "single", scale)
        results[name] = {"score": evaluation.score, "expected": round(sum(float(k) * p for k, p in distribution.items()), 3),
                         "prompt_tokens": len(engine.prompt_ids(messages))}
    right = [results[k]["expected"] for k in ANSWERS if k.startswith("right")]
    bad = [results[k]["expected"] for k in ANSWERS if not k.startswith("right")]
    del engine
    gc.collect()
    return {"model": model, "load_s": round(load_s, 1), "s_per_answer": round(statistics.median(seconds), 2),
            "separates": min(right) > max(bad), "margin": round(min(right) - max(bad), 3), "answers": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale-high", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    scale = judging.RatingScale(1, args.scale_high)
    models = [probe(m, args.dtype, args.threads, scale) for m in args.models]
    emit({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "dtype": args.dtype, "threads": args.threads,
          "scale": [scale.low, scale.high], "question": QUESTION, "models": models,
          "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}, args.out)


if __name__ == "__main__":
    main()
