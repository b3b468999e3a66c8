"""Instruction synthesis: reference-based questioning and role-playing quizzing.

Questioning shows the model a reference chunk and a scenario definition and asks for several
instructions in that scenario. Quizzing makes the model an examiner with a set difficulty, audience,
subject, topic and task, who writes one question with its reference answer (asked for the answer
alone when the first reply has a question but none). Exact and near-duplicate instructions go to
rejects naming their kept twin; the manifest gets a diversity summary per scenario.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from pathlib import Path

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from themis_ray import prompts
from themis_ray.corpus import load_chunks
from themis_ray.dedup import diversity_by, find_duplicates
from themis_ray.engines import build_engine
from themis_ray.scenarios import get_scenario
from themis_ray.schema import REJECT, output_schema, stable_id, to_table
from themis_ray.stages import RowProcessor, engine_label, map_rows
from themis_ray.store import PARTIAL, StageResult

PROMPT_VERSION = "v1"
# "1." "2)" "-" "*" "•", also in Markdown bold ("**1.**") as small models often write them.
_NUMBERED = re.compile(r"^\s*(?:\*\*)?(?:\d{1,2}[.)]|[-*•])(?:\*\*)?\s+(.*\S)\s*$")
# "Question: ... Answer: ...", also with the labels in Markdown bold ("**Question:**").
_QUIZ = re.compile(r"question[\s*]*[:：][\s*]*(?P<q>.+?)[\s*#]*answer[\s*]*[:：][\s*]*(?P<a>.+)", re.I | re.S)
_QUIZ_QUESTION = re.compile(r"question[\s*]*[:：][\s*]*(?P<q>.+)", re.I | re.S)
_ANSWER_LABEL = re.compile(r"^[\s*#]*(?:the\s+)?(?:reference\s+)?answer(?:\s+is)?[\s*]*[:：]?[\s*]*", re.I)


@lru_cache(maxsize=None)
def _data(name: str) -> dict:
    return yaml.safe_load((Path(prompts.TEMPLATE_DIR) / name).read_text())


def parse_instructions(text: str, max_chars: int) -> list[str]:
    """Numbered or bulleted lines; an unnumbered answer counts as one instruction."""
    lines = [m.group(1) for m in map(_NUMBERED.match, text.splitlines()) if m]
    if not lines and text.strip():
        lines = [text.strip()]
    seen, out = set(), []
    for line in lines:
        key = " ".join(line.lower().split())
        if 15 <= len(line) <= max_chars and key not in seen:
            seen.add(key)
            out.append(line)
    return out


def parse_quiz(text: str) -> tuple[str, str] | None:
    match = _QUIZ.search(text)
    if not match:
        return None
    return match.group("q").strip(), match.group("a").strip()


def parse_quiz_question(text: str) -> str | None:
    """A 'Question: ...' without an answer (the examiner forgot it): the question alone."""
    match = _QUIZ_QUESTION.search(text)
    return match.group("q").strip() if match else None


def parse_answer(text: str) -> str:
    return _ANSWER_LABEL.sub("", text.strip(), count=1).strip()


def build_tasks(cfg, scenarios_dir=None) -> tuple[list[dict], list[dict]]:
    """Synthesis prompts (questioning per chunk x scenario, plus quizzes) and corpus rejects."""
    s = cfg.synthesize
    rng = random.Random(s.seed)
    chunks, corpus_rejects = load_chunks(cfg.corpus)
    examples = _data("seed_examples.yaml")
    tasks = []
    # Scenarios go round a seeded order, chunk after chunk, so a few chunks already cover them all.
    order = rng.sample(list(s.questioning_scenarios), len(s.questioning_scenarios))
    per_doc = min(s.scenarios_per_doc, len(order))
    for c, chunk in enumerate(chunks):
        for name in (order[(c * per_doc + j) % len(order)] for j in range(per_doc)):
            scenario = get_scenario(name, scenarios_dir)
            prompt = prompts.render(
                "questioning",
                scenario=scenario,
                reference=chunk["text"],
                n=s.instructions_per_prompt,
                examples=examples.get(name, []),
            )
            tasks.append({"task_id": stable_id(chunk["doc_id"], name, prompt), "doc_id": chunk["doc_id"],
                          "scenario": name, "method": "questioning", "prompt": prompt,
                          "difficulty": None, "audience": None})
    grid = _data("quiz_grid.yaml")
    for k in range(s.quizzes):
        name = s.quizzing_scenarios[k % len(s.quizzing_scenarios)]
        spec = grid["scenarios"][name]
        subject = rng.choice(sorted(spec["subjects"]))
        passage = chunks[k % len(chunks)] if (name == "reading_comprehension" and chunks) else None
        difficulty, audience = rng.choice(grid["difficulty"]), rng.choice(grid["audience"])
        prompt = prompts.render(
            "quizzing",
            difficulty=difficulty,
            audience=audience,
            subject=subject,
            topic=rng.choice(spec["subjects"][subject]),
            task=rng.choice(spec["task"]),
            passage=passage["text"] if passage else None,
        )
        doc_id = passage["doc_id"] if passage else None
        tasks.append({"task_id": stable_id("quiz", k, prompt), "doc_id": doc_id, "scenario": name,
                      "method": "quizzing", "prompt": prompt, "difficulty": difficulty, "audience": audience})
    rejects = [
        {"id": r["id"], "task_id": r["id"], "doc_id": r["doc_id"], "method": "corpus", "raw": r["raw"],
         REJECT: r["reason"]}
        for r in corpus_rejects
    ]
    return tasks, rejects


class Synthesizer(RowProcessor):
    stage = "synthesize"
    resume_key = ("task_id", "task_id")  # a task is done once any of its instructions is accepted

    def __init__(self, output_schema, engine_cfg, sampling, max_instruction_chars):
        super().__init__(output_schema)
        self.engine = build_engine(engine_cfg)
        self.sampling = sampling
        self.max_chars = max_instruction_chars

    def process(self, rows: list[dict]) -> list[dict]:
        completions = self.engine.generate([[{"role": "user", "content": r["prompt"]}] for r in rows], self.sampling)
        answers = self._missing_answers(rows, completions)
        out = []
        for task, done in zip(rows, completions):
            base = {k: task[k] for k in ("task_id", "doc_id", "scenario", "method")}
            base.update(prompt_version=PROMPT_VERSION, raw=done.text)
            if done.error:
                out.append({**base, "id": task["task_id"], REJECT: f"engine error: {done.error}"})
                continue
            if task["method"] == "quizzing":
                quiz = parse_quiz(done.text) or answers.get(task["task_id"])
                found = [quiz] if quiz and 15 <= len(quiz[0]) <= self.max_chars else []
                reason = "no 'Question: ... Answer: ...' in the output"
            else:
                found = [(q, None) for q in parse_instructions(done.text, self.max_chars)]
                reason = f"no instruction of 15..{self.max_chars} characters in the output"
            if not found:
                out.append({**base, "id": task["task_id"], REJECT: reason})
            for instruction, reference in found:
                out.append({**base, "id": stable_id(task["task_id"], instruction), "instruction": instruction,
                            "reference": reference, REJECT: None})
        return out

    def _missing_answers(self, rows: list[dict], completions) -> dict[str, tuple[str, str]]:
        """Quizzes that came back with a question but no answer: ask the examiner for the answer."""
        asks = {}
        for task, done in zip(rows, completions):
            if task["method"] == "quizzing" and not done.error and parse_quiz(done.text) is None:
                question = parse_quiz_question(done.text)
                if question:
                    asks[task["task_id"]] = (question, prompts.render(
                        "quiz_answer", question=question, difficulty=task.get("difficulty") or "",
                        audience=task.get("audience") or ""))
        if not asks:
            return {}
        replies = self.engine.generate([[{"role": "user", "content": p}] for _, p in asks.values()], self.sampling)
        return {task_id: (question, parse_answer(reply.text))
                for (task_id, (question, _)), reply in zip(asks.items(), replies)
                if not reply.error and parse_answer(reply.text)}


def drop_duplicates(table: pa.Table, dedup) -> tuple[pa.Table, int]:
    """Flag exact and near-duplicate accepted instructions as rejects naming the kept twin."""
    accepted = table.filter(pc.is_null(table[REJECT]))
    if not dedup.enabled or accepted.num_rows < 2:
        return table, 0
    # Keep-first in id order: ids are content digests, so the same run keeps the same twin.
    items = sorted(zip(accepted["id"].to_pylist(), accepted["instruction"].to_pylist()))
    found = find_duplicates(items, dedup.threshold, dedup.shingle_chars, dedup.num_perm)
    if not found:
        return table, 0
    ids = table["id"].to_pylist()
    reasons = [found[i].reason if (r is None and i in found) else r for i, r in zip(ids, table[REJECT].to_pylist())]
    return table.set_column(table.schema.get_field_index(REJECT), REJECT, pa.array(reasons, pa.string())), len(found)


def run(cfg, inputs: dict, staging) -> StageResult:
    tasks, corpus_rejects = build_tasks(cfg, cfg.scenarios_dir)
    schema = output_schema("synthesize")
    s = cfg.synthesize
    table = map_rows(
        pa.Table.from_pylist(tasks), Synthesizer, s.pool, schema=schema, checkpoint=Path(staging) / PARTIAL,
        engine_cfg=s.engine, sampling=s.sampling, max_instruction_chars=s.max_instruction_chars,
    )
    table = pa.concat_tables([table, to_table(corpus_rejects, schema, "synthesize")])
    # A task counts once it yielded an instruction; each duplicate found after that is one more unit
    # (a dedup decision), rejected, so rows in = units out + rows rejected still holds.
    units_ok = len(set(table.filter(pc.is_null(table[REJECT]))["task_id"].to_pylist()))
    table, duplicates = drop_duplicates(table, s.dedup)
    accepted = table.filter(pc.is_null(table[REJECT]))
    by_scenario = Counter(accepted["scenario"].to_pylist())
    methods = {f"{sc}:{m}" for sc, m in zip(accepted["scenario"].to_pylist(), accepted["method"].to_pylist())}
    return StageResult(
        table,
        rows_in=len(tasks) + len(corpus_rejects) + duplicates,
        units_ok=units_ok,
        extra={"engine": engine_label(s.engine), "instructions_by_scenario": dict(sorted(by_scenario.items())),
               "methods_by_scenario": {sc: sorted(m.split(":")[1] for m in methods if m.startswith(f"{sc}:"))
                                       for sc in sorted(by_scenario)},
               "duplicates": duplicates,
               "diversity": diversity_by(zip(accepted["scenario"].to_pylist(), accepted["instruction"].to_pylist())),
               "templates": {t: prompts.template_digest(t) for t in ("questioning", "quizzing", "quiz_answer")}},
    )
