"""The table each stage writes: its columns, stable ids, and the reject column.

Every stage adds columns to the rows it receives. A row that a stage cannot process keeps its input
columns, gets null in the new ones, and carries its reason in `reject_reason`; the store writes such
rows to `_rejects/`, so rows in = rows out + rows rejected. Where a program counts rejects by kind (the
stages in `CODED_REJECTS`), a reject also carries a short machine code in `reject_code`: programs read
the code, people the reason.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

REJECT = "reject_reason"
REJECT_CODE = "reject_code"
REJECT_COLUMNS = (REJECT, REJECT_CODE)
# The stages whose rejects carry a code, and the codes they set.
CODED_REJECTS = {
    "synthesize": ("corpus", "engine_error", "no_instruction", "duplicate"),
    "label": ("bad_record", "engine_error", "unparsable", "unclassified"),  # the last: the judge job's router
    # a preference candidate without a pair
    "prefer": ("judged_right", "teacher_inconsistent", "engine_error", "too_long"),
}

# Columns each stage adds, in order. The first stage's columns are its whole table.
STAGE_COLUMNS: dict[str, list[tuple[str, pa.DataType]]] = {
    "synthesize": [
        ("id", pa.string()),  # instruction id: digest of (task id, instruction text)
        ("task_id", pa.string()),  # the synthesis prompt it came from
        ("doc_id", pa.string()),
        ("scenario", pa.string()),
        ("method", pa.string()),  # questioning | quizzing
        ("instruction", pa.string()),
        ("reference", pa.string()),  # reference answer (quizzing), else null
        ("prompt_version", pa.string()),
        ("raw", pa.string()),  # the model's raw output, kept for rejects and audits
    ],
    "classify": [
        ("synthesis_scenario", pa.string()),
        ("predicted_scenario", pa.string()),
        ("scenario_confidence", pa.float64()),
    ],
    "respond": [
        ("instruction_id", pa.string()),
        ("responder", pa.string()),
        ("response", pa.string()),
    ],
    "label": [
        ("response_id", pa.string()),
        ("mode", pa.string()),
        ("prompt", pa.string()),  # the rendered evaluation prompt (the judge's user message)
        ("evaluation", pa.string()),  # the teacher's whole answer, starting with [[n]]
        ("score", pa.float64()),
        ("criterion_scores", pa.list_(pa.float64())),
        ("score_distribution", pa.list_(pa.float64())),  # P(score = low..high) at the [[n]] position
        ("expected_score", pa.float64()),
        ("teacher", pa.string()),
        ("attempts", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("cost_usd", pa.float64()),  # tokens priced by the engine's usd_per_1k_* (0 when unpriced)
        # Pairwise rows only (null on pointwise ones): the two responses, the verdict combined from
        # both orders (A, B, C for a tie), whether the orders agreed, the swapped order's raw answer.
        ("response_a", pa.string()),
        ("response_b", pa.string()),
        ("verdict", pa.string()),
        ("verdict_consistent", pa.bool_()),
        ("evaluation_swapped", pa.string()),
    ],
    "ifd": [
        ("ce_conditioned", pa.float64()),  # mean CE of the answer given the prompt
        ("ce_answer", pa.float64()),  # mean CE of the answer alone
        ("ifd", pa.float64()),  # the loss ratio
        ("ifd_ppl", pa.float64()),  # the perplexity ratio
        ("answer_tokens", pa.int64()),
    ],
    "curate": [
        ("split", pa.string()),  # train | validation
    ],
    "prefer": [  # one row per preference candidate: a pointwise record, or one order of a pairwise one
        ("id", pa.string()),
        ("record_id", pa.string()),  # the curated record
        ("mode", pa.string()),
        ("order", pa.string()),  # pairwise: "as given" | "swapped"
        ("scenario", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),  # the teacher's evaluation
        ("rejected", pa.string()),  # the SFT judge's own answer
        ("mistake", pa.string()),  # score_gap | wrong_verdict | position_flip | unparsed
        ("teacher_score", pa.float64()),
        ("teacher_verdict", pa.string()),
        ("judge_score", pa.float64()),
        ("judge_verdict", pa.string()),
        ("ref_chosen", pa.float64()),  # summed log-probability of the answer under the SFT judge
        ("ref_rejected", pa.float64()),
        ("chosen_tokens", pa.int64()),
        ("rejected_tokens", pa.int64()),
    ],
    "evaluate": [
        ("judge", pa.string()),
        ("judge_output", pa.string()),
        ("predicted_score", pa.float64()),  # null when the judge's answer had no parsable score
        ("predicted_expected", pa.float64()),  # probability-weighted score, where logprobs exist
    ],
}


def output_schema(stage: str, input_schema: pa.Schema | None = None) -> pa.Schema:
    """Input columns (without the old reject columns) + the stage's columns + `reject_reason` (and
    `reject_code` for a stage in CODED_REJECTS)."""
    fields = [f for f in (input_schema or pa.schema([])) if f.name not in REJECT_COLUMNS]
    names = {f.name for f in fields}
    fields += [pa.field(n, t) for n, t in STAGE_COLUMNS[stage] if n not in names]
    return pa.schema(fields + [pa.field(n, pa.string()) for n in REJECT_COLUMNS
                               if n == REJECT or stage in CODED_REJECTS])


def rejected(code: str, reason: str) -> dict:
    """A reject's columns: its machine code and its reason in words."""
    return {REJECT_CODE: code, REJECT: reason}


def to_table(rows: list[dict], schema: pa.Schema, stage: str) -> pa.Table:
    """Rows -> a table of exactly `schema`; a row of the wrong shape fails naming its id and field."""
    columns = {}
    for field in schema:
        values = [row.get(field.name) for row in rows]
        try:
            columns[field.name] = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            for row in rows:
                try:
                    pa.array([row.get(field.name)], type=field.type)
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    raise ValueError(
                        f"{stage}: row {row.get('id')!r} field {field.name!r} is not {field.type}: "
                        f"{row.get(field.name)!r:.80}"
                    ) from err
            raise
    return pa.table(columns, schema=schema)


def stable_id(*parts: object) -> str:
    """A digest of content, so a re-run produces the same ids and can resume by them."""
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:20]
