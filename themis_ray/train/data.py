"""The train stage's data plane: records -> token sequences -> Ray Train workers, all in Ray Data.

1. `prepare_sequences`: one plan reads the records (the curate stage's train split), tokenises them
   in Ray Data tasks (`tokenise_batch`: the tokenizer is loaded once per worker process), rejects the
   too-long ones, packs the rest into sequences of up to `max_length` tokens when `train.packing` is
   on (first-fit decreasing within groups of `PACK_GROUP` records) and writes the sequences to
   `<work>/sequences/` (too-long records to `<work>/sequences/_rejects/`) from the workers. The
   driver only counts: sequences, records and tokens come from the parts' Parquet footers.
2. `record_rows`: per record, its id and token count (or its reject reason), exploded from the
   sequences' `ids` and `segments` by Ray Data tasks: the stage's own output rows.
3. `training_dataset`: what `TorchTrainer(datasets={"train": ...})` splits among the ranks with
   `streaming_split(equal=True)`: `epochs` passes over the sequence parts (each in its own block
   order), plus as many repeated sequences as it takes to make the total a multiple of the global
   batch, so every rank gets exactly `plan.rows_per_rank` sequences and runs the same number of full
   micro-batches (ZeRO-3's collectives hang if one rank runs fewer). Each rank fetches only its own
   blocks; no object holds all records.

The ingest read runs as zero-CPU Ray Data tasks: while training, the train workers hold the CPUs (on
a CPU-only cluster, all of them), and reading pre-tokenised Parquet is light.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc

from themis_ray import fs
from themis_ray.schema import REJECT
from themis_ray.store import StageStore

PACK_GROUP = 1024  # records packed together (first-fit decreasing within each group)
SEQUENCES = "sequences"  # folder under the work dir
PREPARED = "prepared.json"  # written once the sequences and the per-record rows are complete

SEQUENCE_SCHEMA = pa.schema([
    ("ids", pa.list_(pa.string())),  # the records in this sequence
    ("segments", pa.list_(pa.int32())),  # each record's token count, in order
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("kinds", pa.list_(pa.int8())),
    ("tokens", pa.int64()),
    (REJECT, pa.string()),
])
# A preference pair: chosen and rejected as two sequences (prompt + answer + end of turn), with the
# frozen SFT judge's summed answer log-probabilities (the prefer stage's reference).
PAIR_SEQUENCE_SCHEMA = pa.schema([
    ("ids", pa.list_(pa.string())),
    ("segments", pa.list_(pa.int32())),  # chosen and rejected token counts
    ("chosen_input_ids", pa.list_(pa.int32())),
    ("chosen_labels", pa.list_(pa.int32())),
    ("rejected_input_ids", pa.list_(pa.int32())),
    ("rejected_labels", pa.list_(pa.int32())),
    ("ref_chosen", pa.float64()),
    ("ref_rejected", pa.float64()),
    ("tokens", pa.int64()),
    (REJECT, pa.string()),
])
RECORD_SCHEMA = pa.schema([("id", pa.string()), ("tokens", pa.int64()), (REJECT, pa.string())])
TRAIN_COLUMNS = ["input_ids", "labels", "kinds", "segments"]


@dataclass(frozen=True)
class Prepared:
    """The tokenised training data, counted from the footers of the parts the workers wrote."""

    work_uri: str  # the work folder; the sequences are in <work_uri>/sequences
    files: list[str]  # the sequence parts, relative to <work_uri>/sequences
    reject_files: list[str]  # the too-long records' parts, likewise
    sequences: int
    records: int  # records in those sequences
    rejected: int  # too-long records
    tokens: int  # tokens in all sequences

    def save(self) -> None:
        fs.write_json(fs.join(self.work_uri, PREPARED), asdict(self))

    @staticmethod
    def load(work_uri: str) -> Optional["Prepared"]:
        try:
            blob = fs.read_json(fs.join(work_uri, PREPARED))
            return Prepared(**blob) if blob else None
        except (ValueError, TypeError):  # cut short by a crash: prepare again
            return None


@lru_cache(maxsize=4)
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def tokenise_batch(batch: pa.Table, model_dir: str, max_length: int, packing: bool,
                   split: Optional[str] = "train") -> pa.Table:
    """Records (id, prompt, evaluation[, split]) -> sequence rows, and too-long records as rejects."""
    from themis_ray.train.collate import encode_records, pack, sequence_row

    if split is not None and "split" in batch.column_names:
        batch = batch.filter(pc.equal(batch["split"], split))
    records = batch.select(["id", "prompt", "evaluation"]).to_pylist()
    examples, rejects = encode_records(records, _tokenizer(model_dir), max_length)
    rows = [{"ids": [r["id"]], "segments": [r["tokens"]], "tokens": r["tokens"], REJECT: r["reason"]} for r in rejects]
    sequences = pack(examples, max_length) if packing else [[e] for e in examples]
    rows += [{**sequence_row(seq), REJECT: None} for seq in sequences]
    return pa.Table.from_pylist(rows, schema=SEQUENCE_SCHEMA)


def tokenise_pairs(batch: pa.Table, model_dir: str, max_length: int, packing: bool = False) -> pa.Table:
    """Preference pairs (id, prompt, chosen, rejected, ref_chosen, ref_rejected, chosen_tokens,
    rejected_tokens) -> pair rows. A pair whose answer tokens here are not the ones the reference
    scored (`*_tokens`), or that is too long, is a reject: its stored log-probabilities would not be
    comparable with the policy's."""
    from themis_ray.train.collate import IGNORE_INDEX, encode

    tokenizer = _tokenizer(model_dir)
    rows = []
    for r in batch.to_pylist():
        sides = [encode({"id": r["id"], "prompt": r["prompt"], "evaluation": r[side]}, tokenizer)
                 for side in ("chosen", "rejected")]
        lengths = [len(e.input_ids) for e in sides]
        scored = [sum(label != IGNORE_INDEX for label in e.labels) - 1 for e in sides]  # without end of turn
        reason = None
        if max(lengths) > max_length:
            reason = f"too long: {max(lengths)} tokens > max_length {max_length}"
        elif scored != [r["chosen_tokens"], r["rejected_tokens"]]:
            reason = f"answer tokens {scored} differ from the reference's {[r['chosen_tokens'], r['rejected_tokens']]}"
        row = {"ids": [r["id"]], "segments": lengths, "tokens": sum(lengths), REJECT: reason}
        if reason is None:
            row.update(chosen_input_ids=sides[0].input_ids, chosen_labels=sides[0].labels,
                       rejected_input_ids=sides[1].input_ids, rejected_labels=sides[1].labels,
                       ref_chosen=r["ref_chosen"], ref_rejected=r["ref_rejected"])
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=PAIR_SEQUENCE_SCHEMA)


def _sequence_stats(table: pa.Table, rejected: bool) -> dict:
    """Per part: records and tokens (sequences are its row count)."""
    if rejected:
        return {}
    return {"records": pc.sum(pc.list_value_length(table["ids"])).as_py() or 0,
            "tokens": pc.sum(table["tokens"]).as_py() or 0}


def prepare_sequences(records, model_dir: str, cfg: Any, work_uri: str, tokenise=tokenise_batch,
                      schema: pa.Schema = SEQUENCE_SCHEMA) -> Prepared:
    """`records` (a Dataset with id, prompt, evaluation and optionally split) -> token sequences
    written under `<work_uri>/sequences/` by the workers; counts from the parts' footers. The prefer
    stage passes `tokenise_pairs` and `PAIR_SEQUENCE_SCHEMA` (one row per pair)."""
    from themis_ray.executor import map_tasks, write

    store = sequence_store(work_uri)
    fs.delete(store.uri)
    if cfg.packing:
        # Packing works within a block: group records so that every group has room to pack well.
        records = records.repartition(target_num_rows_per_block=PACK_GROUP)
    sequences = map_tasks(records, tokenise, model_dir=model_dir, max_length=int(cfg.max_length),
                          packing=bool(cfg.packing))
    write(sequences, store, schema, stats=_sequence_stats)
    tally = store.tally()
    stats = tally.stats
    return Prepared(work_uri=work_uri, files=tally.files, reject_files=tally.reject_files, sequences=tally.rows_out, records=int(stats.get("records", 0)),
                    rejected=tally.rows_rejected, tokens=int(stats.get("tokens", 0)))


def sequence_store(work_uri: str) -> StageStore:
    return StageStore(work_uri, SEQUENCES)


def _read(prepared: Prepared, names: list[str], columns: list[str], **kwargs):
    import ray

    store = sequence_store(prepared.work_uri)
    return ray.data.read_parquet([fs.resolve(fs.join(store.uri, name))[1] for name in names],
                                 filesystem=store.fs, columns=columns, **kwargs)


def _explode(batch: pa.Table) -> pa.Table:
    """Sequence rows (or rejects) -> one row per record: id, token count, reject reason."""
    reasons = batch[REJECT].to_pylist() if REJECT in batch.column_names else [None] * batch.num_rows
    ids, tokens, why = [], [], []
    for row_ids, segments, reason in zip(batch["ids"].to_pylist(), batch["segments"].to_pylist(), reasons):
        ids += row_ids
        tokens += segments
        why += [reason] * len(row_ids)
    return pa.table({"id": ids, "tokens": tokens, REJECT: why}, schema=RECORD_SCHEMA)


def record_rows(prepared: Prepared):
    """Per record: id and token count, too-long records with their reason (a lazy Dataset)."""
    import ray

    from themis_ray.executor import map_tasks

    parts = []
    if prepared.files:
        parts.append(_read(prepared, prepared.files, ["ids", "segments"]))
    if prepared.reject_files:
        parts.append(_read(prepared, prepared.reject_files, ["ids", "segments", REJECT]))
    if not parts:
        return ray.data.from_arrow(RECORD_SCHEMA.empty_table())
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return map_tasks(ds, _explode)


@contextlib.contextmanager
def _light_reads():
    """Reads planned in this block run as plain read tasks (whose resources a read takes from
    `ray_remote_args`), not through the file-listing operator of Ray Data's newer read path, which
    asks for a whole CPU that the train workers hold."""
    import ray

    ctx = ray.data.DataContext.get_current()
    old = getattr(ctx, "use_datasource_v2", None)
    if old is not None:
        ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        if old is not None:
            ctx.use_datasource_v2 = old


def training_dataset(prepared: Prepared, epochs: int, total_rows: int, seed: int, columns: Optional[list[str]] = None):
    """`epochs` passes over the sequences, each in its own block order, topped up with repeated
    sequences to exactly `total_rows` (the plan's sequences for all ranks); a lazy Dataset of
    `columns` (default: the SFT sequences' `TRAIN_COLUMNS`)."""
    if not prepared.sequences:
        raise ValueError("no training sequences")
    with _light_reads():
        def read():
            return _read(prepared, prepared.files, columns or TRAIN_COLUMNS, num_cpus=0)

        passes = [read().randomize_block_order(seed=seed + epoch) for epoch in range(epochs)]
        extra = total_rows - epochs * prepared.sequences
        if extra < 0:
            raise ValueError(f"the plan ({total_rows} sequences) is shorter than {epochs} epochs "
                             f"of {prepared.sequences} sequences")
        while extra > 0:  # the top-up: sequences from the start again, as a shorter rank would wrap
            take = min(extra, prepared.sequences)
            passes.append(read().limit(take))
            extra -= take
    return passes[0].union(*passes[1:]) if len(passes) > 1 else passes[0]
