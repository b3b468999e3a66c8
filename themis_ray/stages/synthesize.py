"""Instruction synthesis: reference-based questioning and role-playing quizzing.

Questioning shows the model a reference chunk and a scenario definition and asks for several
instructions in that scenario. Quizzing makes the model an examiner with a set difficulty, audience,
subject, topic and task, who writes one question with its reference answer (asked for the answer
alone when the first reply has a question but none). Exact and near-duplicate instructions go to
rejects naming their kept twin; the manifest gets a diversity summary per scenario.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import yaml
from omegaconf import OmegaConf

from themis_ray import fs, prompts
from themis_ray.corpus import document_units, load_chunks, unit_chunks
from themis_ray.dedup import bucket_duplicates, bucket_keys, diversity_by, strongest
from themis_ray.engines import build_engine, engine_label
from themis_ray.engines.cache import cache_folder, with_cache
from themis_ray.executor import (LIGHT_CPUS, RowProcessor, StageContext, Step, StepEngine, map_groups, map_tasks,
                                 run_rows, write)
from themis_ray.scenarios import get_scenario
from themis_ray.schema import REJECT, REJECT_CODE, REJECT_COLUMNS, output_schema, rejected, stable_id, to_table
from themis_ray.store import StageResult, StageStore

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


TASK_SCHEMA = pa.schema([("task_id", pa.string()), ("doc_id", pa.string()), ("scenario", pa.string()),
                         ("method", pa.string()), ("prompt", pa.string()), ("difficulty", pa.string()),
                         ("audience", pa.string()), (REJECT, pa.string())])
CHUNK_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("text", pa.string()),
                          ("rank", pa.string()), (REJECT, pa.string())])


def scenario_order(s) -> list[str]:
    """The questioning scenarios in the seeded order chunks go round."""
    return random.Random(s.seed).sample(list(s.questioning_scenarios), len(s.questioning_scenarios))


def questioning_tasks(chunk: dict, position: int, s, scenarios_dir=None) -> list[dict]:
    """The questioning prompts of the chunk at `position` of the chosen ones: its `scenarios_per_doc`
    scenarios, going round the seeded order chunk after chunk, so a few chunks already cover them all."""
    order = scenario_order(s)
    per_doc = min(s.scenarios_per_doc, len(order))
    examples = _data("seed_examples.yaml")
    tasks = []
    for name in (order[(position * per_doc + j) % len(order)] for j in range(per_doc)):
        prompt = prompts.render("questioning", scenario=get_scenario(name, scenarios_dir), reference=chunk["text"],
                                n=s.instructions_per_prompt, examples=examples.get(name, []))
        tasks.append({"task_id": stable_id(chunk["doc_id"], name, prompt), "doc_id": chunk["doc_id"],
                      "scenario": name, "method": "questioning", "prompt": prompt,
                      "difficulty": None, "audience": None})
    return tasks


def quiz_tasks(s, passages: list[dict]) -> list[dict]:
    """`synthesize.quizzes` quizzing prompts (a config-sized list); reading comprehension quizzes on
    `passages`, the first chosen chunks."""
    rng = random.Random(s.seed)
    rng.sample(list(s.questioning_scenarios), len(s.questioning_scenarios))  # the draw scenario_order made
    grid = _data("quiz_grid.yaml")
    tasks = []
    for k in range(s.quizzes):
        name = s.quizzing_scenarios[k % len(s.quizzing_scenarios)]
        spec = grid["scenarios"][name]
        subject = rng.choice(sorted(spec["subjects"]))
        passage = passages[k % len(passages)] if (name == "reading_comprehension" and passages) else None
        difficulty, audience = rng.choice(grid["difficulty"]), rng.choice(grid["audience"])
        prompt = prompts.render("quizzing", difficulty=difficulty, audience=audience, subject=subject,
                                topic=rng.choice(spec["subjects"][subject]), task=rng.choice(spec["task"]),
                                passage=passage["text"] if passage else None)
        tasks.append({"task_id": stable_id("quiz", k, prompt), "doc_id": passage["doc_id"] if passage else None,
                      "scenario": name, "method": "quizzing", "prompt": prompt, "difficulty": difficulty,
                      "audience": audience})
    return tasks


def corpus_reject(row: dict) -> dict:
    return {"id": row["doc_id"], "task_id": row["doc_id"], "doc_id": row["doc_id"], "method": "corpus",
            "raw": row["raw"], **rejected("corpus", row["reason"])}


def build_tasks(cfg, scenarios_dir=None) -> tuple[list[dict], list[dict]]:
    """Synthesis prompts and corpus rejects in this process (a small corpus; the stage plans them on
    its workers with `plan_tasks`, the same prompts)."""
    s = cfg.synthesize
    chunks, corpus_rejects = load_chunks(cfg.corpus)
    tasks = [t for c, chunk in enumerate(chunks) for t in questioning_tasks(chunk, c, s, scenarios_dir)]
    return tasks + quiz_tasks(s, chunks[: s.quizzes]), [corpus_reject(r) for r in corpus_rejects]


def _chunk_unit(unit: dict, corpus) -> list[dict]:
    rows = unit_chunks(unit, corpus)
    return [{**r, REJECT: r.pop("reason")} for r in rows]


def _corpus_rejects(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    rows = [corpus_reject({"doc_id": r["doc_id"], "raw": r["source"], "reason": r[REJECT]}) for r in batch.to_pylist()]
    return to_table(rows, schema, "synthesize")


def _questioning(batch: pa.Table, s, scenarios_dir) -> pa.Table:
    rows = [t for chunk in batch.to_pylist() for t in questioning_tasks(chunk, chunk["position"], s, scenarios_dir)]
    return to_table(rows, TASK_SCHEMA, "synthesize")


def _planning_key(s) -> dict:
    keys = ("seed", "questioning_scenarios", "quizzing_scenarios", "scenarios_per_doc", "instructions_per_prompt",
            "quizzes")
    return {k: OmegaConf.to_container(s[k]) if OmegaConf.is_config(s[k]) else s[k] for k in keys}


def _block_start(block: pa.Table) -> pa.Table:
    """A sorted block's first rank and its row count (nothing for an empty block)."""
    if not block.num_rows:
        return pa.table({"first": pa.array([], block.schema.field("rank").type), "rows": pa.array([], pa.int64())})
    return pa.table({"first": [pc.min(block["rank"]).as_py()], "rows": [block.num_rows]})


def _numbered(block: pa.Table, offsets: dict) -> pa.Table:
    """Each row's place among the chosen chunks: its block's offset plus its place in the block."""
    if not block.num_rows:
        return block.append_column("position", pa.array([], pa.int64()))
    block = block.sort_by("rank")
    start = offsets[block["rank"][0].as_py()]
    return block.append_column("position", pa.array(range(start, start + block.num_rows), pa.int64()))


def _placed_below(block: pa.Table, n: int) -> pa.Table:
    return block.filter(pc.less(block["position"], n))


def number_by_rank(picked):
    """`picked` (sorted by rank, materialized) with each row's place in rank order, whatever order its
    blocks come in: each block is a run of ranks, so a block's offset is the rows of the blocks whose
    runs start lower. The driver holds two numbers per block."""
    starts = sorted((r["first"], r["rows"]) for r in picked.map_batches(
        _block_start, batch_size=None, batch_format="pyarrow", num_cpus=LIGHT_CPUS).take_all())
    offsets, total = {}, 0
    for first, rows in starts:
        offsets[first], total = total, total + rows
    return picked.map_batches(_numbered, batch_size=None, batch_format="pyarrow", fn_args=(offsets,),
                              num_cpus=LIGHT_CPUS)


def plan_tasks(cfg, store: StageStore, resume: bool) -> tuple[StageStore, StageStore]:
    """The corpus read and chunked by Ray tasks (one per file, saved dataset or docs topic) into the
    `_work/chunks` checkpoint (document rejects as its rejects); the `corpus.max_docs` chunks of lowest
    rank chosen by a distributed sort, numbered in rank order (the scenario rotation needs each chunk's
    place: `number_by_rank`), and turned into prompts on the workers, into `_work/tasks`. The driver lists file
    names and builds the config-sized quizzes. Returns the two checkpoints' stores."""
    s, corpus = cfg.synthesize, cfg.corpus
    plain = OmegaConf.to_object(corpus) if OmegaConf.is_config(corpus) else corpus
    # Neither fill resumes half-way (a unit's rows come from one task, cheap to make again).
    with store.checkpoint("chunks", {"corpus": OmegaConf.to_container(corpus)}, resume, resumable=False) as reading:
        if not reading.done:
            units = document_units(list(corpus.sources))
            if units:
                chunked = ray.data.from_items(units).flat_map(_chunk_unit, fn_args=(plain,), num_cpus=LIGHT_CPUS)
                write(chunked, reading.store, CHUNK_SCHEMA)
    chunks = reading.store
    with store.checkpoint("tasks", {"chunks": chunks.manifest()["digest"], "synthesize": _planning_key(s)},
                          resume, resumable=False) as planning:
        if not planning.done:
            kept = chunks.num_rows()
            chosen = min(kept, int(corpus.max_docs))
            passages = []
            if chosen:
                picked = chunks.dataset(columns=["doc_id", "text", "rank"]).sort("rank").limit(chosen).materialize()
                numbered = number_by_rank(picked).materialize()
                write(map_tasks(numbered, _questioning, s=s, scenarios_dir=cfg.scenarios_dir), planning.store,
                      TASK_SCHEMA)
                first = numbered.map_batches(_placed_below, batch_size=None, batch_format="pyarrow",
                                             fn_args=(s.quizzes,), num_cpus=LIGHT_CPUS).take_all()
                passages = sorted(first, key=lambda chunk: chunk["position"])
            quizzes = quiz_tasks(s, passages)
            if quizzes:
                write(ray.data.from_arrow(to_table(quizzes, TASK_SCHEMA, "synthesize")), planning.store, TASK_SCHEMA)
    return chunks, planning.store


class Synthesizer(RowProcessor):
    stage = "synthesize"
    resume_key = ("task_id", "task_id")  # a task is done once its instructions (or its reject) are written

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
                out.append({**base, "id": task["task_id"], **rejected("engine_error", f"engine error: {done.error}")})
                continue
            if task["method"] == "quizzing":
                quiz = parse_quiz(done.text) or answers.get(task["task_id"])
                found = [quiz] if quiz and 15 <= len(quiz[0]) <= self.max_chars else []
                reason = "no 'Question: ... Answer: ...' in the output"
            else:
                found = [(q, None) for q in parse_instructions(done.text, self.max_chars)]
                reason = f"no instruction of 15..{self.max_chars} characters in the output"
            if not found:
                out.append({**base, "id": task["task_id"], **rejected("no_instruction", reason)})
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


BUCKETS = pa.schema([("bucket", pa.string()), ("id", pa.string()), ("instruction", pa.string())])
EDGES = pa.schema([("id", pa.string()), ("twin", pa.string()), ("similarity", pa.float64())])


def _buckets(batch: pa.Table, dedup) -> pa.Table:
    rows = [(key, i, text) for i, text in zip(batch["id"].to_pylist(), batch["instruction"].to_pylist())
            for key in bucket_keys(text, dedup.threshold, dedup.shingle_chars, dedup.num_perm)]
    return pa.Table.from_pylist([dict(zip(BUCKETS.names, r)) for r in rows], schema=BUCKETS)


def _bucket_edges(group: pa.Table, dedup) -> pa.Table:
    members = list(zip(group["id"].to_pylist(), group["instruction"].to_pylist()))
    exact = group["bucket"][0].as_py().startswith("x")
    edges = bucket_duplicates(members, exact, dedup.threshold, dedup.shingle_chars) if len(members) > 1 else []
    return pa.Table.from_pylist([dict(zip(EDGES.names, e)) for e in edges], schema=EDGES)


def duplicate_edges(instructions, dedup, rows: int):
    """Accepted instructions (a Dataset of id, instruction) -> a Dataset of (id, twin, similarity) edges:
    each instruction is sent to its buckets, a groupby brings each bucket together, and only a bucket's
    members are compared."""
    return map_groups(map_tasks(instructions, _buckets, dedup=dedup), "bucket", _bucket_edges, rows=rows, dedup=dedup)


@ray.remote(num_cpus=LIGHT_CPUS)
def _load_duplicates(files: list[str], stage_uri: str) -> dict:
    """The duplicate table (one entry per duplicate, not per instruction), built by a worker."""
    filesystem, _ = fs.resolve(stage_uri)
    edges = []
    for path in files:
        t = pq.read_table(path, filesystem=filesystem)
        edges += zip(t["id"].to_pylist(), t["twin"].to_pylist(), t["similarity"].to_pylist())
    return {i: (d.kept_id, d.similarity, d.reason) for i, d in strongest(edges).items()}


def _flag_duplicates(batch: pa.Table, duplicates=None) -> pa.Table:
    """Accepted instructions with the reject columns, set on the duplicates (naming their twin)."""
    for column in REJECT_COLUMNS:
        if column not in batch.column_names:  # accepted parts have none
            batch = batch.append_column(column, pa.nulls(batch.num_rows, pa.string()))
    if isinstance(duplicates, ray.ObjectRef):
        duplicates = ray.get(duplicates)
    if not duplicates:
        return batch
    reasons, codes = batch[REJECT].to_pylist(), batch[REJECT_CODE].to_pylist()
    for n, i in enumerate(batch["id"].to_pylist()):
        if reasons[n] is None and i in duplicates:  # an earlier reject keeps its own
            reasons[n], codes[n] = duplicates[i][2], "duplicate"
    for column, values in ((REJECT, reasons), (REJECT_CODE, codes)):
        batch = batch.set_column(batch.schema.get_field_index(column), column, pa.array(values, pa.string()))
    return batch


def synthesis_stats(table: pa.Table, rejected: bool) -> dict:
    """Per part: tasks that yielded an instruction, duplicates found, and accepted rows by scenario and method."""
    if rejected:
        return {"duplicates": pc.sum(pc.equal(table[REJECT_CODE], "duplicate")).as_py() or 0}
    by = Counter(zip(table["scenario"].to_pylist(), table["method"].to_pylist()))
    methods: dict = {}
    for (scenario, method), n in by.items():
        methods.setdefault(scenario, {})[method] = n
    # A task's instructions come from one process() call, so they are in one part: distinct per part
    # adds up to distinct overall.
    return {"tasks_ok": len(set(table["task_id"].to_pylist())), "by_scenario_method": methods}


def _in_sample(batch: pa.Table, fraction: float) -> pa.Table:
    keep = [int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) < fraction * 2**32 for i in batch["id"].to_pylist()]
    return batch.select(["scenario", "instruction"]).filter(pa.array(keep, pa.bool_()))


def run(ctx: StageContext) -> StageResult:
    cfg, s = ctx.cfg, ctx.cfg.synthesize
    store = ctx.store
    schema = output_schema("synthesize")
    chunks, planned = plan_tasks(cfg, store, ctx.resume)
    tasks, corpus_rejects = planned.num_rows(), chunks.manifest()["rows_rejected"]
    # 1. Generation, into _work/generated: a resumed run keeps the tasks already answered.
    with store.checkpoint("generated", {"tasks": planned.manifest()["digest"]}, ctx.resume) as generation:
        generated = generation.store
        if not generation.done:
            if tasks:
                engine = with_cache(s.engine, cache_folder(cfg.cache, cfg.run_dir))  # pay once per prompt
                step = Step(name="synthesize", processor=Synthesizer, pool=s.pool, stats=synthesis_stats,
                            engine=StepEngine(engine, "synthesize.engine"),
                            args={"engine_cfg": engine, "sampling": s.sampling,
                                  "max_instruction_chars": s.max_instruction_chars})
                run_rows(planned.dataset(), step, generated, schema, resume=generation.resume, total=tasks)
            generation.rows_in, generation.units_ok = tasks, generated.tally().stats.get("tasks_ok", 0)
    # 2. The stage's parts: instructions less their duplicates, the generation's and the corpus' rejects.
    store.clear_parts()  # what a crashed run of this step had written is written again
    if corpus_rejects:
        write(map_tasks(chunks.dataset(rejects=True), _corpus_rejects, schema=schema), store, schema)
    if generated.reject_files():
        write(generated.dataset(rejects=True), store, schema)
    duplicates = None
    if s.dedup.enabled and generated.num_rows() > 1:
        edges = store.file("_work", "duplicates")
        fs.delete(edges)
        duplicate_edges(generated.dataset(columns=["id", "instruction"]), s.dedup, generated.num_rows()).write_parquet(
            fs.resolve(edges)[1], filesystem=store.fs)
        duplicates = _load_duplicates.remote(fs.list_files(edges, ".parquet"), store.uri)
    write(map_tasks(generated.dataset(), _flag_duplicates, duplicates=duplicates), store, schema,
          stats=synthesis_stats)
    written = store.tally()
    found = written.stats.get("duplicates", 0)
    by = written.stats.get("by_scenario_method", {})
    return StageResult(
        rows_in=tasks + corpus_rejects + found,
        # A task counts once it yielded an instruction; each duplicate found after that is one more unit
        # (a dedup decision), rejected, so rows in = units out + rows rejected still holds.
        units_ok=generated.manifest()["units_ok"],
        extra={"engine": engine_label(s.engine),
               "instructions_by_scenario": {sc: sum(m.values()) for sc, m in sorted(by.items())},
               "methods_by_scenario": {sc: sorted(m) for sc, m in sorted(by.items())},
               "duplicates": found,
               "diversity": _diversity(store, written.rows_out, s.diversity_sample),
               "templates": {t: prompts.template_digest(t) for t in ("questioning", "quizzing", "quiz_answer")}},
    )


def _diversity(store: StageStore, rows: int, sample: int) -> dict:
    """Diversity per scenario over the kept instructions, or over a seeded sample of about `sample` of
    them (by a hash of the id) when there are more: distinct n-grams need the texts in one place."""
    files = store.written_files(rejects=False)
    if not files:
        return {}
    fraction = min(1.0, sample / rows) if rows else 1.0
    kept = ray.data.read_parquet(files, filesystem=store.fs).select_columns(["id", "scenario", "instruction"])
    texts = map_tasks(kept, _in_sample, fraction=fraction)
    return diversity_by((r["scenario"], r["instruction"]) for r in texts.iter_rows())
