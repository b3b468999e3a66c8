"""Preference optimisation: DPO on the SFT judge's own mistakes (RISE-Judge), with the order swap as a
mistake of its own (J1), in train's ZeRO-3 loop. Four steps, each on its own store:

1. **Mine** (`Miner`, `_work/mine`): the SFT judge re-judges a pool of curated training records
   (originals of the train split, never validation; `prefer.pool_size` of them, picked by id) through
   the prompts and parsing of label and serve (`judging.py`): a pointwise record once, a pairwise one
   in both orders.
2. **Pair** (`pair_candidates`): each judgment is a candidate (a pointwise record one, a pairwise
   record two: one per order). Chosen is the teacher's evaluation, rejected the judge's own where it
   is wrong: a score at least `prefer.min_score_gap` from the teacher's (`score_gap`), a verdict that
   disagrees with the teacher's (`wrong_verdict`), or one that changes when the order is swapped
   (`position_flip`). An answer that does not parse at all is a mistake too (`unparsed`): it is the
   judge failing at the format the teacher's answer shows, the cheapest thing DPO can fix.
   A candidate without a pair is a reject with its code: `judged_right`, `teacher_inconsistent`
   (the teacher's answer in that order does not state its own combined verdict), `engine_error`,
   `too_long` (prompt + answer over `train.max_length`). Rows in = candidates = pairs + no-pair.
3. **Reference** (`ReferenceScorer`): log-probabilities of chosen and rejected under the frozen SFT
   judge, summed over the answer's tokens, by the engines' `token_logprobs` (the ifd stage's scorer),
   stored as `ref_chosen` and `ref_rejected`: training never holds a reference model.
4. **Optimise**: the pairs, tokenised in Ray Data (`train.data.tokenise_pairs`), trained with
   `objectives.PreferenceObjective` in `recipe.fit`: same shards, checkpoints, resume and export as
   train, to `<run_dir>/prefer/judge`, with `prefer_metrics.jsonl` and `prefer_loss.png`.

No pair at all (the judge is right everywhere it was asked) is not an error: the stage commits its
counts and says so, and no judge is exported.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import OmegaConf

from themis_ray import fs, judging
from themis_ray.assets import resolve_model
from themis_ray.engines import build_engine, engine_label
from themis_ray.executor import RowProcessor, StageContext, Step, StepEngine, partials, run_rows
from themis_ray.schema import REJECT, REJECT_CODE, output_schema, rejected, stable_id
from themis_ray.store import WORK, StageResult

JUDGE_DIR = "judge"
METRICS_FILE = "prefer_metrics.jsonl"
LOSS_PLOT = "prefer_loss.png"
ORDERS = ("as given", "swapped")

MINED_SCHEMA = pa.schema([
    ("id", pa.string()), ("mode", pa.string()), ("scenario", pa.string()),
    ("prompt", pa.string()), ("prompt_swapped", pa.string()),
    ("evaluation", pa.string()), ("evaluation_swapped", pa.string()),  # the teacher's, per order
    ("score", pa.float64()), ("verdict", pa.string()),  # the teacher's
    ("judge_output", pa.string()), ("judge_output_swapped", pa.string()),
    ("judge_error", pa.string()),  # the engine's error, if it failed
    (REJECT, pa.string()),
])


def validate(c) -> None:
    if c.pool_size < 0:
        raise ValueError(f"prefer.pool_size must be >= 0 (0: every train record), got {c.pool_size}")
    if c.min_score_gap <= 0:
        raise ValueError(f"prefer.min_score_gap must be > 0, got {c.min_score_gap}")
    if c.beta <= 0:
        raise ValueError(f"prefer.beta must be > 0, got {c.beta}")
    if c.sft_weight < 0:
        raise ValueError(f"prefer.sft_weight must be >= 0, got {c.sft_weight}")
    if c.epochs < 1 or c.learning_rate <= 0:
        raise ValueError("prefer.epochs must be >= 1 and prefer.learning_rate > 0")


def judge_model(cfg) -> str:
    """The SFT judge: `prefer.model`, or this run's train/judge."""
    return resolve_model(cfg.prefer.model or fs.join(cfg.run_dir, "train", JUDGE_DIR))


def pool_dataset(curate, pool_size: int):
    """The curated training records the judge re-judges: originals (no augmented or swapped copies)
    of the train split, the first `pool_size` by id (ids are content digests: an unbiased pick)."""
    names = curate.schema().names
    columns = [n for n in ("id", "mode", "scenario", "instruction", "reference", "response", "response_a",
                           "response_b", "prompt", "evaluation", "evaluation_swapped", "score", "verdict", "split",
                           "augmentation_kind") if n in names]
    ds = curate.dataset(columns=columns)

    def originals(batch: pa.Table) -> pa.Table:
        keep = pc.fill_null(pc.equal(batch["split"], "train"), False)
        if "augmentation_kind" in batch.column_names:
            keep = pc.and_(keep, pc.is_null(batch["augmentation_kind"]))
        return batch.filter(keep)

    from themis_ray.executor import map_tasks

    ds = map_tasks(ds, originals)
    return ds.sort("id").limit(pool_size) if pool_size else ds


class Miner(RowProcessor):
    """The SFT judge's answers to the pool: pointwise once, pairwise in both orders."""

    stage = "prefer"
    resume_key = ("id", "id")

    def __init__(self, output_schema, engine_cfg, sampling, rationale_tokens, scenarios_dir):
        super().__init__(output_schema)
        self.engine = build_engine(engine_cfg)
        self.sampling, self.rationale_tokens, self.scenarios_dir = sampling, rationale_tokens, scenarios_dir

    def process(self, rows: list[dict]) -> list[dict]:
        out = []
        asks: dict[str, list[tuple[int, str, str]]] = {"single": [], "pairwise": []}  # (row, column, prompt)
        for i, row in enumerate(rows):
            pairwise = row.get("mode") == "pairwise"
            base = {k: row.get(k) for k in MINED_SCHEMA.names if k in row}
            base.update(mode=row.get("mode") or "single", judge_error=None, **{REJECT: None})
            if pairwise:
                try:
                    request = judging.request_from_row(row, self.scenarios_dir, mode="pairwise")
                    base["prompt_swapped"] = judging.render_prompt(judging.swap_pair(request), self.scenarios_dir)
                except (ValueError, KeyError) as err:
                    base["judge_error"] = f"bad record: {err}"
            out.append(base)
            if base["judge_error"] is None:
                kind = "pairwise" if pairwise else "single"
                asks[kind].append((i, "judge_output", base["prompt"]))
                if pairwise:
                    asks[kind].append((i, "judge_output_swapped", base["prompt_swapped"]))
        for mode, items in asks.items():
            if not items:
                continue
            sampling = judging.stop_at_verdict(self.sampling, mode, self.rationale_tokens)
            done = self.engine.generate([judging.build_messages(p) for _, _, p in items], sampling)
            for (i, column, _), completion in zip(items, done):
                if completion.error:
                    out[i]["judge_error"] = f"engine error: {completion.error}"
                out[i][column] = completion.text
        return out


def _mistake(teacher, judged, flipped: bool = False) -> str | None:
    """Why the judge's parsed answer is wrong, or None when it is right."""
    if judged is None:
        return "unparsed"
    if isinstance(teacher, str):
        return None if judged == teacher else ("position_flip" if flipped else "wrong_verdict")
    return None


def pair_candidates(row: dict, min_score_gap: float) -> list[dict]:
    """One mined record -> its candidates: pairs (prompt, chosen, rejected, mistake), or no-pair rows
    with their reject code. Pointwise: one candidate; pairwise: one per order."""
    mode = row.get("mode") or "single"
    if mode == "pairwise":
        sides = [(row["prompt"], row.get("evaluation"), row.get("judge_output")),
                 (row.get("prompt_swapped"), row.get("evaluation_swapped"), row.get("judge_output_swapped"))]
        judged = [judging.parse_evaluation(t or "", "pairwise").verdict for _, _, t in sides]
        # A flip: both orders answered, and they name different responses.
        flipped = None not in judged and not judging.combine_pairwise(judged[0], judged[1])[1]
        teacher = [row.get("verdict"), judging.unswap_verdict(row.get("verdict"))]
    else:
        sides = [(row["prompt"], row.get("evaluation"), row.get("judge_output"))]
        judged = [judging.parse_evaluation(row.get("judge_output") or "", "single").score]
        flipped, teacher = False, [row.get("score")]
    out = []
    for k, (prompt, chosen, answer) in enumerate(sides):
        order = ORDERS[k] if mode == "pairwise" else None
        cand = {"id": stable_id(row["id"], "prefer", order), "record_id": row["id"], "mode": mode, "order": order,
                "scenario": row.get("scenario"), "prompt": prompt, "chosen": chosen, "rejected": answer,
                "teacher_score": row.get("score") if mode != "pairwise" else None,
                "teacher_verdict": teacher[k] if mode == "pairwise" else None,
                "judge_score": judged[k] if mode != "pairwise" else None,
                "judge_verdict": judged[k] if mode == "pairwise" else None,
                "mistake": None, REJECT: None, REJECT_CODE: None}
        if row.get("judge_error"):
            out.append({**cand, **rejected("engine_error", row["judge_error"])})
            continue
        if mode == "pairwise":
            stated = judging.parse_evaluation(chosen or "", "pairwise").verdict
            if not chosen or teacher[k] is None or stated != teacher[k]:
                out.append({**cand, **rejected("teacher_inconsistent",
                                               f"the teacher's answer in this order states {stated!r}, not its "
                                               f"verdict {teacher[k]!r}: no trustworthy chosen side")})
                continue
            mistake = _mistake(teacher[k], judged[k], flipped)
        else:
            if teacher[k] is None or not chosen:
                out.append({**cand, **rejected("teacher_inconsistent", "the teacher's record has no score or "
                                                                       "evaluation: no chosen side")})
                continue
            mistake = _mistake(teacher[k], judged[k])
            if mistake is None and abs(judged[k] - float(teacher[k])) >= min_score_gap:
                mistake = "score_gap"
        if mistake is None:
            out.append({**cand, **rejected("judged_right", "the judge agrees with the teacher: no pair")})
        else:
            out.append({**cand, "mistake": mistake})
    return out


class ReferenceScorer(RowProcessor):
    """Mined records -> candidates; each pair gets the frozen SFT judge's log-probabilities of its
    chosen and rejected answers (the ifd stage's scorer), a pair over `max_length` tokens a reject."""

    stage = "prefer"
    resume_key = ("id", "record_id")

    def __init__(self, output_schema, engine_cfg, min_score_gap: float, max_length: int):
        super().__init__(output_schema)
        self.engine = build_engine(engine_cfg)
        self.min_score_gap, self.max_length = min_score_gap, max_length

    def process(self, rows: list[dict]) -> list[dict]:
        out = [c for row in rows for c in pair_candidates(row, self.min_score_gap)]
        pairs = [c for c in out if c[REJECT] is None]
        if not pairs:
            return out
        prompts = [judging.build_messages(c["prompt"]) for c in pairs]
        scores = self.engine.token_logprobs(prompts + prompts, [c["chosen"] for c in pairs] +
                                            [c["rejected"] or "" for c in pairs])
        for c, chosen, rejected_ in zip(pairs, scores[:len(pairs)], scores[len(pairs):]):
            error = chosen.error or rejected_.error
            if error:
                code = "too_long" if "max_model_len" in error else "engine_error"
                c.update(rejected(code, f"cannot score: {error}"))
                continue
            # The training sequence: prompt, answer and the end-of-turn token.
            longest = chosen.num_prompt_tokens + max(len(chosen.logprobs), len(rejected_.logprobs)) + 1
            if longest > self.max_length:
                c.update(rejected("too_long", f"too long: {longest} tokens > train.max_length {self.max_length}"))
                continue
            c.update(ref_chosen=float(sum(chosen.logprobs)), ref_rejected=float(sum(rejected_.logprobs)),
                     chosen_tokens=len(chosen.logprobs), rejected_tokens=len(rejected_.logprobs))
        return out


def pair_stats(table: pa.Table, rejected_rows: bool) -> dict:
    """Per part: pairs by mistake, or no-pair candidates by reason."""
    column = REJECT_CODE if rejected_rows else "mistake"
    counts = table.group_by(column).aggregate([(column, "count")]).to_pylist() if table.num_rows else []
    key = "no_pair" if rejected_rows else "pairs_by_mistake"
    return {key: {str(r[column]): r[f"{column}_count"] for r in counts}}


def _pool_counts(batch: pa.Table) -> dict:
    pairwise = pc.sum(pc.fill_null(pc.equal(batch["mode"], "pairwise"), False)).as_py() or 0
    return {"pairwise": pairwise, "pointwise": batch.num_rows - pairwise}


def optimise_config(cfg):
    """train's section with the prefer stage's own schedule: the loop, workers and limits are train's."""
    c = cfg.prefer
    return OmegaConf.merge(cfg.train, {
        "epochs": c.epochs, "learning_rate": c.learning_rate, "warmup_ratio": c.warmup_ratio,
        "global_batch_size": c.global_batch_size or cfg.train.global_batch_size,
        "checkpoint_every": cfg.train.checkpoint_every if c.checkpoint_every is None else c.checkpoint_every,
        "packing": False, "sim_loss_weight": 0.0, "seed": c.seed,
    })


def run(ctx: StageContext) -> StageResult:
    from themis_ray.train.data import PAIR_SEQUENCE_SCHEMA, Prepared, prepare_sequences, tokenise_pairs
    from themis_ray.train.recipe import check_memory, check_model_dir, fit
    from themis_ray.train.recipe import validate as validate_train

    cfg, c = ctx.cfg, ctx.cfg.prefer
    validate(c)
    train_cfg = optimise_config(cfg)
    validate_train(train_cfg)
    judge_dir = judge_model(cfg)
    check_model_dir(judge_dir)
    engine_cfg = OmegaConf.merge(c.engine, {"model": judge_dir})
    engine = StepEngine(engine_cfg, "prefer.engine", scores=True)

    # 1. Mine: a resumed stage keeps what the judge already answered.
    with ctx.store.checkpoint("mine", {"pool_size": c.pool_size, "sampling": OmegaConf.to_container(c.sampling),
                                       "rationale_tokens": c.rationale_tokens}, ctx.resume) as mine:
        if not mine.done:
            step = Step(name="prefer.mine", processor=Miner, pool=c.pool, engine=engine,
                        args={"engine_cfg": engine_cfg, "sampling": c.sampling,
                              "rationale_tokens": c.rationale_tokens, "scenarios_dir": cfg.scenarios_dir})
            run_rows(pool_dataset(ctx.input("curate"), c.pool_size), step, mine.store, MINED_SCHEMA,
                     resume=mine.resume)
    mined = mine.store
    pool = partials(mined.dataset(columns=["mode"]), _pool_counts) if mined.num_rows() else {}
    pool = {"pointwise": int(pool.get("pointwise", 0)), "pairwise": int(pool.get("pairwise", 0))}
    if not sum(pool.values()):
        raise ValueError("prefer: the pool is empty: curate left no original train-split records to re-judge")
    if not pool["pairwise"]:
        print("prefer: the pool holds no pairwise records (label.pairwise is off?): mining pointwise "
              f"mistakes only, {pool['pointwise']} records")

    # 2 + 3. Pair and reference log-probabilities: one row per candidate, no-pair ones as rejects.
    rows_in = pool["pointwise"] + 2 * pool["pairwise"]
    schema = output_schema("prefer")
    step = Step(name="prefer.pair", processor=ReferenceScorer, pool=c.pool, engine=engine, stats=pair_stats,
                args={"engine_cfg": engine_cfg, "min_score_gap": float(c.min_score_gap),
                      "max_length": int(train_cfg.max_length)})
    run_rows(mined.dataset(), step, ctx.store, schema, resume=ctx.resume, total=mined.num_rows())
    tally = ctx.store.tally()
    no_pair = dict(sorted(tally.stats.get("no_pair", {}).items()))
    extra = {"engine": engine_label(engine_cfg), "sft_judge": judge_dir, "pool": pool, "candidates": rows_in,
             "pairs": tally.rows_out, "pairs_by_mistake": dict(sorted(tally.stats.get("pairs_by_mistake", {}).items())),
             "no_pair": no_pair}
    if not tally.rows_out:
        print(f"prefer: no preference pairs among {rows_in} candidates ({no_pair}): the SFT judge is kept as it "
              "is; raise prefer.pool_size or lower prefer.min_score_gap to find mistakes")
        return StageResult(rows_in=rows_in, extra={**extra, "optimised": False})

    # 4. Optimise, in train's loop: tokenised pairs in the work folder, then Ray Train.
    work = ctx.store.file(WORK)
    memory = check_memory(judge_dir, train_cfg, sequences_per_row=2)  # chosen and rejected together
    prepared = Prepared.load(work) if ctx.resume else None
    if prepared is None:
        import ray

        # The stage's parts as its workers wrote them (the manifest, which lists them, comes last).
        pairs = ray.data.read_parquet([fs.resolve(ctx.store.file(name))[1] for name in tally.files],
                                      filesystem=ctx.store.fs,
                                      columns=["id", "prompt", "chosen", "rejected", "ref_chosen", "ref_rejected",
                                               "chosen_tokens", "rejected_tokens"])
        prepared = prepare_sequences(pairs, judge_dir, train_cfg, work, tokenise=tokenise_pairs,
                                     schema=PAIR_SEQUENCE_SCHEMA)
        prepared.save()
    else:
        print(f"prefer: resuming with the prepared {prepared.sequences} pairs")
    if not prepared.sequences:
        raise ValueError(f"prefer: no pair could be tokenised ({prepared.rejected} rejected; see "
                         f"{work}/sequences/_rejects)")
    summary = fit(prepared, judge_dir, train_cfg, output_uri=ctx.store.file(JUDGE_DIR), work_uri=work,
                  metrics_uri=ctx.store.file(METRICS_FILE), loss_plot_uri=ctx.store.file(LOSS_PLOT), memory=memory,
                  objective={"objective": "dpo", "beta": float(c.beta), "sft_weight": float(c.sft_weight)})
    for key in ("judge_dir", "metrics", "loss_plot"):
        if summary.get(key):
            summary[key] = summary[key].rstrip("/").rsplit("/", 1)[-1]
    return StageResult(rows_in=rows_in, extra={**extra, "optimised": True, "optimise": summary})

