"""Parsing the synthesizer's output (numbered instructions, quiz question/answer pairs), task planning,
dedup of a stage table, and one real synthesis run on local Ray covering the ten scenarios."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from themis_ray.config import DedupConfig, load
from themis_ray.schema import REJECT, REJECT_CODE, output_schema, to_table
from themis_ray.stages.synthesize import (
    build_tasks,
    parse_answer,
    parse_instructions,
    parse_quiz,
    parse_quiz_question,
)

ROOT = Path(__file__).resolve().parents[1]
TEN = {"close_qa", "open_qa", "math_qa", "creative_writing", "informative_writing", "rewriting", "translation",
       "reading_comprehension", "role_playing", "programming"}

A = "Explain what a Python generator is and when to use one."
B = "Write a short poem about list comprehensions."
C = "Summarise the difference between a tuple and a list."


def test_numbered_with_dots_and_parens():
    text = f"1. {A}\n2) {B}\n3.   {C}   "
    assert parse_instructions(text, 500) == [A, B, C]


def test_bullets():
    text = f"- {A}\n* {B}\n• {C}"
    assert parse_instructions(text, 500) == [A, B, C]


def test_markdown_bold_numbers():
    text = f"**1.** {A}\n**2.** {B}"
    assert parse_instructions(text, 500) == [A, B]


def test_stray_text_around_the_list_is_ignored():
    text = f"Sure! Here are three instructions:\n\n1. {A}\n\n2. {B}\nI hope these help.\n3. {C}\n"
    assert parse_instructions(text, 500) == [A, B, C]


def test_duplicates_are_dropped_ignoring_case_and_spacing():
    text = f"1. {A}\n2. {A.upper()}\n3. {'  '.join(A.split())}\n4. {B}"
    assert parse_instructions(text, 500) == [A, B]


def test_too_short_and_too_long_are_dropped():
    long = "Describe " + "very " * 30 + "carefully."
    short = "Be brief."  # 9 characters
    text = f"1. {short}\n2. {A}\n3. {long}\n4. {'x' * 15}\n5. {'y' * 14}"
    assert len(long) > 100
    assert parse_instructions(text, 100) == [A, "x" * 15]
    assert parse_instructions(text, len(long)) == [A, long, "x" * 15]


def test_unnumbered_answer_is_one_instruction():
    assert parse_instructions(f"  {A}  \n", 500) == [A]
    assert parse_instructions("   \n  ", 500) == []
    assert parse_instructions("Too short", 500) == []


def test_numbers_need_a_space_and_at_most_two_digits():
    # "3.14 is pi" is not an item; "100. x" is not a list number
    text = f"1. {A}\n3.14159 is the value of pi to five places.\n100. {B}"
    assert parse_instructions(text, 500) == [A]


def test_parse_quiz_plain():
    assert parse_quiz("Question: What is 2 + 2?\nAnswer: 4") == ("What is 2 + 2?", "4")


def test_parse_quiz_case_whitespace_and_fullwidth_colon():
    assert parse_quiz("QUESTION :  Name a prime.\n\nanswer：  7  ") == ("Name a prime.", "7")


def test_parse_quiz_multiline_question_with_passage():
    text = 'Intro.\nQuestion: Read this:\n"""\nCats sleep.\n"""\nWhat do cats do?\nAnswer: They sleep.'
    assert parse_quiz(text) == ('Read this:\n"""\nCats sleep.\n"""\nWhat do cats do?', "They sleep.")


def test_parse_quiz_markdown_bold_labels():
    assert parse_quiz("**Question:** What is 2 + 2?\n**Answer:** 4") == ("What is 2 + 2?", "4")


def test_parse_quiz_missing_parts():
    assert parse_quiz("What is 2 + 2? The answer is 4.") is None
    assert parse_quiz("Question: What is 2 + 2?") is None
    assert parse_quiz("Answer: 4") is None


def test_parse_quiz_question_without_an_answer():
    assert parse_quiz_question("The question: What is 3 squared?") == "What is 3 squared?"
    assert parse_quiz_question("**Question:** Name a prime below 10.") == "Name a prime below 10."
    assert parse_quiz_question("What is 3 squared?") is None


@pytest.mark.parametrize("text", ["Answer: 9", "**Answer:** 9", "The answer is: 9", "The reference answer: 9", " 9 "])
def test_parse_answer_strips_its_label(text):
    assert parse_answer(text) == "9"


def test_tasks_cover_every_scenario_with_its_method():
    cfg = load(ROOT / "configs" / "quickstart.yaml")
    tasks, _ = build_tasks(cfg)
    methods = {(t["scenario"], t["method"]) for t in tasks}
    assert {s for s, _ in methods} == TEN
    assert {s for s, m in methods if m == "quizzing"} == {"math_qa", "programming", "reading_comprehension"}
    per_doc = {}
    for t in tasks:
        if t["method"] == "questioning":
            per_doc.setdefault(t["doc_id"], []).append(t["scenario"])
    assert all(len(v) == len(set(v)) == cfg.synthesize.scenarios_per_doc for v in per_doc.values())
    assert build_tasks(cfg)[0] == tasks  # seeded


def _row(i, instruction, reject=None, code=None):
    return {"id": f"id{i}", "task_id": f"t{i}", "doc_id": "d", "scenario": "open_qa", "method": "questioning",
            "instruction": instruction, "reference": None, "prompt_version": "v1", "raw": instruction,
            REJECT: reject, REJECT_CODE: code}


def test_duplicates_are_flagged_naming_their_twin_and_earlier_rejects_keep_their_reason():
    from themis_ray.dedup import bucket_keys, strongest
    from themis_ray.stages.synthesize import _bucket_edges, _flag_duplicates, synthesis_stats

    base = "Explain what a Python generator is and when you would use one instead of a list."
    rows = [_row(1, base), _row(2, base.replace("Explain", "Describe")), _row(3, base.upper()),
            _row(4, "Write a haiku about rain falling on a tin roof."),
            _row(5, None, "engine error: a duplicate of request 7 was refused", "engine_error")]
    table = to_table(rows, output_schema("synthesize"), "synthesize")
    # What the groupby does at scale, here by hand: each instruction into its buckets, each bucket judged.
    buckets: dict = {}
    for row in rows[:4]:
        for key in bucket_keys(row["instruction"]):
            buckets.setdefault(key, []).append(row)
    edges = [e for key, members in buckets.items() if len(members) > 1
             for e in _bucket_edges(pa.Table.from_pylist([{"bucket": key, "id": m["id"], "instruction": m["instruction"]}
                                                         for m in members]), DedupConfig()).to_pylist()]
    found = {i: (d.kept_id, d.similarity, d.reason)
             for i, d in strongest((e["id"], e["twin"], e["similarity"]) for e in edges).items()}
    out = _flag_duplicates(table, found)
    reasons = dict(zip(out["id"].to_pylist(), out[REJECT].to_pylist()))
    assert reasons["id1"] is None and reasons["id4"] is None
    assert reasons["id3"] == "exact duplicate of id1"
    assert reasons["id2"].startswith("near duplicate of id1 (Jaccard ")
    assert reasons["id5"].startswith("engine error:")  # an earlier reject keeps its reason
    codes = dict(zip(out["id"].to_pylist(), out[REJECT_CODE].to_pylist()))
    assert codes == {"id1": None, "id2": "duplicate", "id3": "duplicate", "id4": None, "id5": "engine_error"}
    assert out.num_rows == table.num_rows
    # The stage's duplicate count reads the code: an engine error whose text says "duplicate of" is not one.
    rejects = out.filter(pc.is_valid(out[REJECT]))
    assert synthesis_stats(rejects, rejected=True) == {"duplicates": 2}


@pytest.mark.integration
def test_synthesis_run_on_local_ray_covers_the_ten_scenarios(tmp_path):
    import ray

    from themis_ray.pipeline import run_stage
    from themis_ray.store import StageStore

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "empty.txt").write_text("  \n")
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = load(ROOT / "configs" / "quickstart.yaml", [
        f"run_dir={tmp_path / 'run'}", "corpus.max_docs=4", "synthesize.quizzes=3",
        "synthesize.sampling.max_tokens=72", f"corpus.sources=[python-docs,{docs}]",
    ])
    try:
        manifest = run_stage(cfg, "synthesize")
    finally:
        ray.shutdown()
    store = StageStore(cfg.run_dir, "synthesize")
    kept, rejects = store.read(), store.read_rejects()
    # The prompts the workers planned (the corpus read and chunked by Ray tasks, the chunks chosen by a
    # distributed sort) are the ones the in-process planner makes, scenario rotation included.
    planned = StageStore(store.uri, "_work/tasks").read().to_pylist()
    assert sorted(planned, key=lambda t: t["task_id"]) == sorted(build_tasks(cfg)[0], key=lambda t: t["task_id"])
    # every unit is accounted for: tasks (4 chunks x 2 scenarios + 3 quizzes), corpus rejects, duplicates
    assert manifest["rows_in"] == 4 * 2 + 3 + 2 + manifest["duplicates"]
    assert manifest["rows_in"] == manifest["units_ok"] + manifest["rows_rejected"]
    assert {t["scenario"] for t in planned} == TEN
    # Each scenario yielded instructions, or the small model wrote none for its tasks (rejected, with why).
    failed = {r["scenario"] for r in rejects.to_pylist() if r[REJECT_CODE] == "no_instruction"}
    assert set(manifest["instructions_by_scenario"]) | failed == TEN and len(failed) <= 2
    for scenario, method in (("math_qa", "quizzing"), ("close_qa", "questioning")):
        assert {t["method"] for t in planned if t["scenario"] == scenario} == {method}
        assert manifest["methods_by_scenario"].get(scenario, [method]) == [method]
    quizzes = kept.filter(pa.compute.equal(kept["method"], "quizzing")).to_pylist()
    assert quizzes and all(q["reference"] for q in quizzes)  # a quiz always carries its reference answer
    assert all(r["doc_id"] and r["prompt_version"] for r in kept.filter(
        pa.compute.equal(kept["method"], "questioning")).to_pylist())
    reasons = rejects[REJECT].to_pylist()
    assert "empty document" in reasons and any(r.startswith("not UTF-8") for r in reasons)
    # duplicates name an earlier instruction of this run (kept, or itself a duplicate of an earlier one)
    instruction_ids = set(kept["id"].to_pylist()) | set(rejects["id"].to_pylist())
    for row in rejects.to_pylist():
        if "duplicate of " in row[REJECT]:
            twin = row[REJECT].split("duplicate of ")[1].split()[0]
            assert twin in instruction_ids and twin < row["id"]
    diversity = manifest["diversity"]
    assert set(diversity) == set(manifest["instructions_by_scenario"]) | {"all"}
    assert diversity["all"]["count"] == kept.num_rows
    assert all(0 < d["distinct_1"] <= 1 for d in diversity.values())



@pytest.mark.integration
def test_chunks_are_numbered_in_rank_order_whatever_order_their_blocks_come_in(ray_local):
    """Ray Data streams blocks as they finish: a sorted dataset's blocks may arrive in any order. Each
    chunk's place in the scenario rotation is still its rank's."""
    from themis_ray.stages.synthesize import number_by_rank

    ray = ray_local
    # Sorted runs of ranks (hex digests, as the corpus ranks chunks), the blocks out of order.
    runs = [["c7", "c8", "c9"], ["a1", "a2"], [], ["b4", "b5", "b6"]]
    blocks = [pa.table({"doc_id": [f"d-{r}" for r in run], "rank": pa.array(run, pa.string())}) for run in runs]
    numbered = number_by_rank(ray.data.from_arrow(blocks).materialize()).take_all()
    assert sorted((r["position"], r["rank"]) for r in numbered) == list(enumerate(sorted(sum(runs, []))))
