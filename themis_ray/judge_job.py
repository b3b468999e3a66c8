"""Judge any dataset: `themis-ray judge --config FILE input=URI output=URI [key=value ...]`.

A user's Parquet, JSONL or CSV files (a file or a folder, local or on any pyarrow filesystem) are judged
on the streaming data plane, one Ray Data plan: read (one task per file, row numbers kept) -> map the
user's columns onto the judge's fields (a row that cannot be judged becomes a reject naming its file,
row and column) -> a scenario for rows without one (the configured classifier) -> the judge on its
actor pool, with the same prompts and parsing as labeling and serving (`judging`, through the label
stage's processors) -> Parquet parts written by the actors under `output`, rejects under
`output/_rejects/` with the reason and the raw answer. Rows in = rows out + rows rejected; a run that
died resumes without asking any written row again.

Output columns: the input's columns (a column whose name the judge writes itself, such as `prompt`
or `score`, is kept as `input.<name>`), `_file` and `_row`, the judge's fields (`instruction`,
`response`, ... as mapped), and what the judge said: `score`, `expected_score` and
`score_distribution` (where the engine gives log-probabilities), `verdict` and `verdict_consistent`
for pairs (judged in both orders), `evaluation` (the text), `judge`, tokens and `cost_usd`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from themis_ray import fs, judging
from themis_ray.classifier import ScenarioPredictor, predictor_engine
from themis_ray.config import digest
from themis_ray.engines import engine_label
from themis_ray.engines.cache import cache_folder, with_cache
from themis_ray.executor import RowProcessor, Step, StepEngine, map_processor, map_tasks, partials, run_rows
from themis_ray.records import RowError, UserColumns, as_text, column_kinds, read_records, record_files, user_rows
from themis_ray.scenarios import load_scenarios
from themis_ray.schema import REJECT, REJECT_CODE, REJECT_COLUMNS, STAGE_COLUMNS, output_schema, rejected, stable_id
from themis_ray.stages.label import Labeler, PairLabeler
from themis_ray.store import StageResult, StageStore

FIELDS = ("id", "instruction", "response", "reference", "response_a", "response_b", "scenario", "mode")
FIELD_TYPES = [(f, pa.string()) for f in FIELDS] + [("_file", pa.string()), ("_row", pa.int64())]
PREFIX = "input."  # an input column the judge's own output would overwrite keeps its value under this prefix


class DatasetJudge(Labeler):
    """The label stage's judging, per row in its own mode: pairs in both orders, the rest scored."""

    stage = "judge"
    judge_column = "judge"

    def process(self, rows: list[dict]) -> list[dict]:
        out: dict[int, dict] = {}
        groups: dict[str, list[int]] = {"pairwise": [], "pointwise": []}
        for i, row in enumerate(rows):
            if row.get(REJECT):  # could not be read or mapped: a reject, keyed like every output row
                out[i] = {**row, "response_id": row["id"]}
            else:
                groups["pairwise" if row.get("mode") == "pairwise" else "pointwise"].append(i)
        for kind, process in (("pointwise", Labeler.process), ("pairwise", PairLabeler.process)):
            if groups[kind]:
                out.update(zip(groups[kind], process(self, [rows[i] for i in groups[kind]])))
        return [out[i] for i in range(len(rows))]


class ScenarioRouter(RowProcessor):
    """A scenario for each row that has none, by the configured classifier (zero-shot or trained)."""

    stage = "judge"

    def __init__(self, output_schema, classify_cfg, scenarios_dir):
        super().__init__(output_schema)
        model_dir = fs.local_dir(classify_cfg.model) if classify_cfg.method == "trained" else None
        self.predictor = ScenarioPredictor(classify_cfg.engine, scenarios_dir, model_dir)

    def process(self, rows: list[dict]) -> list[dict]:
        for row in rows:
            if row.get(REJECT) is None and not row.get("scenario"):
                try:
                    row["scenario"], _ = self.predictor.predict(row["instruction"])
                except ValueError as err:
                    where = f"{row['_file']}:{row['_row']}"
                    row.update(rejected("unclassified", f"{where}: cannot classify the instruction: {err}"))
        return rows


# ---------------------------------------------------------------------------------- input columns


ARROW = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string()}


def input_schema(kinds: dict[str, dict]) -> pa.Schema:
    """The input's columns, typed by what every row holds (mixed or nested values: JSON text)."""
    fields = []
    for name, seen in kinds.items():
        names = set(seen) or {"str"}
        kind = "float" if names == {"int", "float"} else names.pop() if len(names) == 1 else "json"
        fields.append(pa.field(name, ARROW.get(kind, pa.string())))
    return pa.schema(fields)


def schemas(inputs: pa.Schema) -> tuple[pa.Schema, pa.Schema]:
    """(rows the judge reads, rows it writes): the input's columns (renamed where the judge writes a
    column of that name), `_file`, `_row` and the judge's fields; then what the judge adds."""
    written = {n for n, _ in STAGE_COLUMNS["label"]} | {"judge", *REJECT_COLUMNS}
    kept = [pa.field(PREFIX + f.name if f.name in written else f.name, f.type) for f in inputs if f.name not in FIELDS]
    prepared = pa.schema(kept + [pa.field(n, t) for n, t in FIELD_TYPES]
                         + [pa.field(n, pa.string()) for n in REJECT_COLUMNS])
    judged = output_schema("label", prepared)
    return prepared, pa.schema([pa.field("judge" if f.name == "teacher" else f.name, f.type) for f in judged])


# ---------------------------------------------------------------------------------- mapping rows


def _value(value: Any, kind: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_string(kind):
        return as_text(value)
    if pa.types.is_floating(kind):
        return float(value)
    return value


def prepare(batch: pa.Table, schema: pa.Schema, columns: dict, mode: Optional[str], scenario: Optional[str],
            scenarios: list[str]) -> pa.Table:
    """Records -> rows for the judge, each with its mapped fields or the reason it cannot be judged."""
    fields = UserColumns("judge", FIELDS, columns)
    out = []
    for user in user_rows(batch):
        row: dict[str, Any] = {"_file": user.file, "_row": user.row}
        if user.error:
            out.append({**row, "id": stable_id(user.file, user.row),
                        **rejected("bad_record", f"{user.where}: {user.error}")})
            continue
        for f in schema:
            source = f.name[len(PREFIX):] if f.name.startswith(PREFIX) else f.name
            if source in user.record and f.name not in FIELDS:
                row[f.name] = _value(user.record[source], f.type)
        row.update({field: fields.text(user.record, field) for field in FIELDS})
        row["id"] = row["id"] or stable_id(user.file, user.row, user.raw)
        row["mode"] = mode or row["mode"] or ("pairwise" if row["response_a"] is not None and row["response"] is None
                                               else None)
        row["scenario"] = row["scenario"] or scenario
        try:
            _check(user.record, row, fields, scenarios)
        except RowError as err:
            row.update(rejected("bad_record", f"{user.where}: {err}"))
        out.append(row)
    return pa.Table.from_pylist([{**dict.fromkeys(schema.names), **r} for r in out], schema=schema)


def _check(record: dict, row: dict, fields: UserColumns, scenarios: list[str]) -> None:
    """RowError (naming the input's column) where a mapped row cannot be judged."""
    needed = ["instruction"] + (["response_a", "response_b"] if row["mode"] == "pairwise" else ["response"])
    if row["mode"] == "reference":
        needed.append("reference")
    for field in needed:
        fields.required(record, field)
    if row["mode"] not in (None, *judging.MODES):
        raise RowError(f"{fields.name('mode')}: {row['mode']!r} is not one of {', '.join(judging.MODES)}")
    if row["scenario"] is not None and row["scenario"] not in scenarios:
        raise RowError(f"{fields.name('scenario')}: unknown scenario {row['scenario']!r}; "
                       f"known: {', '.join(scenarios)}")


# ------------------------------------------------------------------------------------ the job


def router_step(cfg) -> Step:
    """The scenario router on `judge.classify.pool`, its engine declared so that the executor checks
    it on the driver and gives its actors their GPUs."""
    c = cfg.judge.classify
    return Step(name="judge.classify", processor=ScenarioRouter, pool=c.pool,
                args={"classify_cfg": c, "scenarios_dir": cfg.scenarios_dir},
                engine=predictor_engine(c, "judge.classify.engine"))


def judge_step(cfg, scale: judging.RatingScale) -> Step:
    """The judge on `judge.pool`: the label stage's judging, each row in its own mode, its requests
    through the job's request cache (`<output>/_cache/requests` unless `cache.path` says otherwise)."""
    c = cfg.judge
    engine = with_cache(c.engine, cache_folder(cfg.cache, cfg.output))
    criteria = [{"name": x.name, "description": x.description} for x in c.criteria] if c.criteria else None
    return Step(name="judge", processor=DatasetJudge, pool=c.pool,
                engine=StepEngine(c.engine, "judge.engine", scores=not c.rationale),  # no rationale: chosen by log-prob
                stats=judge_stats,
                args={"engine_cfg": engine, "sampling": c.sampling, "score_by": "text", "calibrate": False,
                      "prefill": c.prefill_score, "max_attempts": c.max_attempts, "retry_temperature": 0.7,
                      "scenarios_dir": cfg.scenarios_dir, "scale": (scale.low, scale.high), "criteria": criteria,
                      "rationale": c.rationale, "rationale_tokens": c.rationale_tokens})


def judge_stats(table: pa.Table, rejected: bool) -> dict:
    """Per part: tokens and cost (rejects too: their attempts were paid for), scores, pairs, failures."""
    stats: dict = {key: pc.sum(table[key]).as_py() or 0 for key in ("prompt_tokens", "completion_tokens", "cost_usd")}
    if rejected:
        stats["unparsable"] = pc.sum(pc.equal(table[REJECT_CODE], "unparsable")).as_py() or 0
        return stats
    scores = [round(s) for s in table["score"].to_pylist() if s is not None]
    histogram: dict = {}
    for s in scores:
        histogram[str(s)] = histogram.get(str(s), 0) + 1
    pairs = pc.fill_null(pc.equal(table["mode"], "pairwise"), False)
    return {**stats, "score_histogram": histogram, "pairs": pc.sum(pairs).as_py() or 0,
            "pairs_consistent": pc.sum(pc.fill_null(table["verdict_consistent"], False)).as_py() or 0}


def judge_dataset(cfg) -> dict:
    """Judge every record of `cfg.input` into `cfg.output`; returns the output's manifest."""
    from themis_ray.pipeline import run_stored

    c = cfg.judge
    if not cfg.input or not cfg.output:
        raise ValueError("themis-ray judge needs input=PATH_OR_URI and output=PATH_OR_URI")
    UserColumns("judge", FIELDS, c.columns)  # an unknown field is a config error before anything runs
    if c.mode is not None and c.mode not in judging.MODES:
        raise ValueError(f"judge.mode must be one of {', '.join(judging.MODES)} or unset; got {c.mode!r}")
    scenarios = sorted(load_scenarios(cfg.scenarios_dir))
    if c.scenario is not None and c.scenario not in scenarios:
        raise ValueError(f"judge.scenario: unknown scenario {c.scenario!r}; known: {', '.join(scenarios)}")
    scale = _scale(c.scale)
    _check_apart(cfg.input, cfg.output)
    files = record_files(cfg.input)
    store = StageStore.at(cfg.output)
    fp = {"config": digest({"judge": c, "scenarios_dir": cfg.scenarios_dir}), "input": cfg.input,
          "files": digest([[f, fs.resolve(f)[0].get_file_info(fs.resolve(f)[1]).size] for f in files])}

    def work(resume: bool) -> StageResult:
        records = read_records(cfg.input)
        seen = partials(records, column_kinds)  # one light pass: how many rows, which columns and types
        prepared, schema = schemas(input_schema(seen.get("columns", {})))
        rows = map_tasks(records, prepare, schema=prepared, columns=dict(c.columns), mode=c.mode,
                         scenario=c.scenario, scenarios=scenarios)

        def route(ds):  # scenarios for the rows without one, only when some may lack it
            if c.scenario is not None:
                return ds
            return map_processor(ds, router_step(cfg), prepared)

        run_rows(rows, judge_step(cfg, scale), store, schema, resume=resume, before=route, total=seen.get("rows", 0),
                 retry_rejects=c.retry_rejects)
        return StageResult(rows_in=seen.get("rows", 0), extra=_summary(cfg, store, scale))

    return run_stored(cfg, "judge", store, fp, print_summary, work)


def _summary(cfg, store: StageStore, scale: judging.RatingScale) -> dict:
    """The manifest's figures from the written parts' footers, and the score histogram's plot."""
    written = store.tally()
    stats, rows_out = written.stats, written.rows_out
    judged = rows_out + stats.get("unparsable", 0)
    extra = {
        "input": cfg.input, "judge": engine_label(cfg.judge.engine),
        "parse_rate": round(rows_out / judged, 4) if judged else None,
        "score_histogram": dict(sorted(stats.get("score_histogram", {}).items(), key=lambda kv: int(kv[0]))),
        "pairs": stats.get("pairs", 0),
        "position_consistency": round(stats["pairs_consistent"] / stats["pairs"], 4) if stats.get("pairs") else None,
        "prompt_tokens": stats.get("prompt_tokens", 0), "completion_tokens": stats.get("completion_tokens", 0),
        "cost_usd": round(stats.get("cost_usd", 0.0), 6),
    }
    with store.local_folder() as folder:
        extra["plot"] = _plot_histogram(extra["score_histogram"], scale, folder)
    return extra


def _check_apart(input_uri: str, output_uri: str) -> None:
    """Refuse an output that is the input, holds it, or lies inside an input folder: a run starts by
    clearing its output (the input would be deleted), and a folder input would read the judge's own
    parts as input on the next run."""
    (in_fs, in_path), (out_fs, out_path) = fs.resolve(input_uri), fs.resolve(output_uri)
    if in_fs.type_name != out_fs.type_name:
        return
    if in_fs.type_name == "local":  # links and relative paths: the same folder by any name
        in_path, out_path = os.path.realpath(in_path), os.path.realpath(out_path)
    elif input_uri.split("://")[0] != output_uri.split("://")[0]:
        return
    if in_path == out_path or in_path.startswith(out_path.rstrip("/") + "/"):
        raise ValueError(f"output {output_uri} contains the input {input_uri}: the run would delete it; "
                         f"name an output folder outside the input")
    if out_path.startswith(in_path.rstrip("/") + "/"):
        raise ValueError(f"output {output_uri} is inside the input folder {input_uri}: a later run would read "
                         f"the judged rows as input; name an output folder outside the input")


def _scale(text: Optional[str]) -> judging.RatingScale:
    if not text:
        return judging.RatingScale(1, 5)
    low, _, high = str(text).partition("-")
    try:
        return judging.RatingScale(int(low), int(high))
    except ValueError:
        raise ValueError(f"judge.scale is written low-high, like 1-10; got {text!r}") from None


def _plot_histogram(histogram: dict, scale: judging.RatingScale, folder: str) -> Optional[str]:
    if not histogram:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(scale.scores, [histogram.get(str(s), 0) for s in scale.scores], color="#4c72b0")
    ax.set_xlabel("score")
    ax.set_ylabel("records")
    ax.set_title("judged scores")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "score_histogram.png"))
    return "score_histogram.png"


def print_summary(manifest: dict, skipped: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="judge" + (" (skipped: up to date)" if skipped else ""), title_justify="left")
    for column in ("rows in", "judged", "rejected", "parse rate", "pairs consistent", "tokens", "cost $", "wall s"):
        table.add_column(column, justify="right")
    consistency = manifest.get("position_consistency")
    table.add_row(str(manifest["rows_in"]), str(manifest["rows_out"]), str(manifest["rows_rejected"]),
                  f"{manifest['parse_rate']:.3f}" if manifest.get("parse_rate") is not None else "-",
                  f"{consistency:.3f}" if consistency is not None else "-",
                  str(manifest["prompt_tokens"] + manifest["completion_tokens"]), f"{manifest['cost_usd']:.4f}",
                  f"{manifest['wall_s']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"  scores: {manifest.get('score_histogram')}  (plot: {manifest.get('plot')})")
