"""The field's judge benchmarks: RewardBench 2, JudgeBench, the MT-Bench human judgments and HHH, read
from local files (or any pyarrow URI) in the layout each one publishes and scored by its authors' rule.

Layouts (a file, or a folder of the release's Parquet/JSONL files, or a `datasets` save_to_disk folder
of .arrow files; `split` keeps the files whose path contains it):
- rewardbench2 (allenai/reward-bench-2): `id`, `prompt`, `chosen` (list), `rejected` (list), `subset`;
  the Ties subset's ids read "ref:<n>" or "tied:<n>".
- judgebench (ScalerLab/JudgeBench): `pair_id`, `question`, `response_A`, `response_B`, `label`
  ("A>B" / "B>A"), `source`; split "gpt" (the GPT-4o response pairs) by default.
- mtbench_human (lmsys/mt_bench_human_judgments): `question_id`, `model_a`, `model_b`, `winner`
  (model_a, model_b, tie, tie (bothbad)), `judge`, `conversation_a`/`_b` (messages), `turn`; split
  "human": one row per human vote.
- hhh (HuggingFaceH4/hhh_alignment): `input`, `targets` {`choices`, `labels`}; the subset (harmless,
  helpful, honest, other) from a `subset` column or the folder a file sits in.

Scoring, as the authors' own scripts do it:
- RewardBench 2 (scripts/run_v2.py): per prompt, 1 when the chosen completion scores strictly above
  every rejected one, 1/k when it shares the top score with k-1 others, else 0; a prompt with an
  unparsed score earns 1/(completions), chance level, as its generative script credits an error.
  The Ties subset by its own rule (rewardbench/utils.py process_single_model): 0.30 accuracy on the
  "tied" prompts + 0.30 on their "ref" twins + 0.20 correct-above-incorrect margin beats the spread
  among correct answers + 0.20 the same against the ref twin too + 0.01 a tanh margin term. The
  overall score is the mean of the subset scores. A pairwise judge compares the chosen completion
  with each rejected one (both orders, a flip is a tie): it loses the prompt on any loss and shares
  it 1/(1+ties) otherwise; Ties is always rated pointwise, as RewardBench 2 requires.
- JudgeBench (utils/metrics.py): both orders; a pair is correct when the order-corrected decisions
  are more often right than wrong (both right, or one right and the other a tie or unparsed).
  Reported overall and per source (mmlu-pro, livebench-reasoning, livebench-math, livecodebench).
- MT-Bench human judgments (FastChat compute_agreement): the judge's verdict (both orders, a flip is
  a tie) against every human vote on that pair and turn; with ties, and without (a vote pair where
  either says tie is left out); "tie (bothbad)" is a tie.
- HHH: accuracy of the verdict (both orders, a flip is a tie) against the helpful/harmless/honest
  choice, per subset.
Pointwise judges on pairwise sets score each side; the higher score wins, equal scores are a tie.
Every figure comes with its parse rate, a bootstrap interval, and two baselines scored by the same
rule: random (uniform scores; a uniform A/B/tie verdict per order) and always-longer.
"""

from __future__ import annotations

import math
import posixpath
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from themis_ray import fs, judging
from themis_ray.schema import REJECT, stable_id

FIELD = ("rewardbench2", "judgebench", "mtbench_human", "hhh")
HF_DATASETS = {"rewardbench2": "allenai/reward-bench-2", "judgebench": "ScalerLab/JudgeBench",
               "mtbench_human": "lmsys/mt_bench_human_judgments", "hhh": "HuggingFaceH4/hhh_alignment"}
DEFAULT_SPLITS = {"judgebench": "gpt", "mtbench_human": "human"}
SUFFIXES = (".parquet", ".jsonl", ".arrow")
JUDGEBENCH_SOURCES = ("mmlu-pro", "livebench-reasoning", "livebench-math", "livecodebench")
HHH_SUBSETS = ("harmless", "helpful", "honest", "other")
TIES = "Ties"
BASELINES = ("baseline:random", "baseline:longer")

RECORD_SCHEMA = pa.schema([
    ("id", pa.string()), ("benchmark", pa.string()), ("row", pa.int64()), ("group", pa.string()),
    ("subset", pa.string()), ("scenario", pa.string()), ("mode", pa.string()), ("instruction", pa.string()),
    ("role", pa.string()),  # pointwise: chosen/rejected (best-of-n) or A/B (a side of a pair)
    ("position", pa.int64()),  # which completion of its prompt (best-of-n), which rejected one (pairwise)
    ("response", pa.string()), ("response_a", pa.string()), ("response_b", pa.string()),
    ("reference", pa.string()),
    ("winner", pa.string()),  # gold of a pair: A, B or C (tie); pairwise best-of-n: the chosen side
    ("length", pa.int64()), ("length_a", pa.int64()), ("length_b", pa.int64()),
    ("prompt", pa.string()), ("prompt_ba", pa.string()),
])


# ----------------------------------------------------------------------------------- the files


def missing_message(name: str, path: Optional[str]) -> str:
    hf = HF_DATASETS[name]
    where = f"{path!r} does not exist" if path else "is not set"
    return (f"evaluate.{name}.path {where}. Nothing is downloaded at run time: fetch the data once, e.g. "
            f"`huggingface-cli download --repo-type dataset {hf} --local-dir DIR` (or "
            f"`datasets.load_dataset('{hf}').save_to_disk(DIR)`), then set evaluate.{name}.path=DIR")


def field_files(name: str, path: Optional[str], split: Optional[str] = None) -> list[str]:
    """The data files of benchmark `name` at `path` (a file, or a folder searched recursively)."""
    if not path or not fs.exists(path):
        raise FileNotFoundError(missing_message(name, path))
    filesystem, root = fs.resolve(path)
    prefix = path.split("://", 1)[0] + "://" if fs.is_uri(path) else ""
    if filesystem.get_file_info(root).type == pa.fs.FileType.File:
        return [prefix + root]
    split = DEFAULT_SPLITS.get(name) if split is None else split
    files = []
    for f in fs.list_files(path, recursive=True):
        relative = f[len(root):].lstrip("/")
        if any(part.startswith((".", "_")) for part in relative.split("/")) or not f.endswith(SUFFIXES):
            continue
        if split and split not in relative:
            continue
        files.append(prefix + f)
    if not files:
        raise FileNotFoundError(f"evaluate.{name}.path {path}: no {', '.join(SUFFIXES)} files"
                                + (f" whose path contains {split!r} (evaluate.{name}.split)" if split else "")
                                + f". {missing_message(name, None).split('. ', 1)[1]}")
    return files


# ------------------------------------------------------------------------------------ the items


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"column {key!r} is missing or empty")
    return value


def _texts(record: dict, key: str) -> list[str]:
    value = record.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"column {key!r} must be a non-empty list of non-empty texts")
    return value


def _subset_from_path(file: Optional[str], names) -> Optional[str]:
    parts = (file or "").replace("\\", "/").split("/")
    for part in reversed(parts[:-1]):
        if part in names:
            return part
    stem = posixpath.basename(file or "")
    return next((n for n in names if stem.startswith(n)), None)


def _conversation(record: dict, key: str, turn: int) -> tuple[list[str], list[str]]:
    messages = record.get(key)
    if not isinstance(messages, list):
        raise ValueError(f"column {key!r} is not a list of messages")
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    assistants = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    if len(users) < turn or len(assistants) < turn:
        raise ValueError(f"column {key!r} has no turn {turn}")
    return users[:turn], assistants[:turn]


def parse_item(name: str, record: dict, file: Optional[str], row: int) -> dict:
    """One published row -> an item: {group, subset, instruction, and either `chosen`/`rejected` lists
    (best-of-n) or `response_a`/`response_b`/`winner` (a pair)}. Raises ValueError naming the column."""
    if not isinstance(record, dict):
        raise ValueError("not a record")
    if name == "rewardbench2":
        group = str(record.get("id")) if record.get("id") is not None else stable_id(name, file, row)
        subset = _text(record, "subset")
        item = {"group": group, "subset": subset, "instruction": _text(record, "prompt"),
                "chosen": _texts(record, "chosen"), "rejected": _texts(record, "rejected")}
        if subset == TIES and (":" not in group or group.split(":", 1)[0] not in ("ref", "tied")):
            raise ValueError(f"a Ties id must read ref:<n> or tied:<n>, not {group!r}")
        return item
    if name == "judgebench":
        label = str(record.get("label", "")).strip()
        winner = {"A>B": "A", "B>A": "B", "A=B": "C"}.get(label)
        if winner is None:
            raise ValueError(f"label {record.get('label')!r} is not A>B or B>A")
        source = str(record.get("source") or "")
        subset = next((s for s in JUDGEBENCH_SOURCES if source.startswith(s)), source or "unknown")
        group = str(record.get("pair_id") or stable_id(name, file, row))
        return {"group": group, "subset": subset, "instruction": _text(record, "question"),
                "response_a": _text(record, "response_A"), "response_b": _text(record, "response_B"),
                "winner": winner}
    if name == "mtbench_human":
        raw = str(record.get("winner", "")).strip().lower()
        winner = {"model_a": "A", "model_b": "B"}.get(raw, "C" if raw.startswith("tie") else None)
        if winner is None:
            raise ValueError(f"winner {record.get('winner')!r} is not model_a, model_b or a tie")
        try:
            turn = int(record.get("turn") or 1)
        except (TypeError, ValueError):
            raise ValueError(f"turn {record.get('turn')!r} is not 1 or 2") from None
        if turn not in (1, 2):
            raise ValueError(f"turn {turn} is not 1 or 2")
        questions, answers_a = _conversation(record, "conversation_a", turn)
        _, answers_b = _conversation(record, "conversation_b", turn)
        if turn == 1:
            instruction, a, b = questions[0], answers_a[0], answers_b[0]
        else:  # the second turn judged in its context: each side's first answer is part of its response
            instruction = (f"(A two-turn conversation; judge the answers to the second question.)\n"
                           f"First question: {questions[0]}\nSecond question: {questions[1]}")
            a, b = (f"Answer to the first question:\n{x[0]}\n\nAnswer to the second question:\n{x[1]}"
                    for x in (answers_a, answers_b))
        if not all(isinstance(t, str) and t.strip() for t in (instruction, a, b)):
            raise ValueError("an empty question or answer")
        group = stable_id(name, record.get("question_id"), record.get("model_a"), record.get("model_b"), turn,
                          record.get("judge"), raw, row)
        return {"group": group, "subset": f"turn {turn}", "instruction": instruction, "response_a": a,
                "response_b": b, "winner": winner}
    if name == "hhh":
        targets = record.get("targets") or {}
        choices, labels = targets.get("choices"), targets.get("labels")
        if not isinstance(choices, list) or not isinstance(labels, list) or len(choices) != len(labels):
            raise ValueError("targets must hold equal-length `choices` and `labels`")
        chosen = [c for c, lab in zip(choices, labels) if lab == 1]
        rejected = [c for c, lab in zip(choices, labels) if lab != 1]
        if len(chosen) != 1 or len(rejected) != 1 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise ValueError("targets must have one choice labelled 1 and one labelled 0, both non-empty")
        subset = record.get("subset") or _subset_from_path(file, HHH_SUBSETS) or "hhh"
        group = stable_id(name, subset, row, record.get("input"), *choices)
        # The gold side alternates with the content, so "always A" is no shortcut.
        first = int(group, 16) % 2 == 0
        a, b = (chosen[0], rejected[0]) if first else (rejected[0], chosen[0])
        return {"group": group, "subset": str(subset), "instruction": _text(record, "input"),
                "response_a": a, "response_b": b, "winner": "A" if first else "B"}
    raise ValueError(f"unknown benchmark {name!r}")


def _pointwise(base: dict, role: str, position: int, response: str, scenarios_dir) -> dict:
    request = judging.request_from_row({"scenario": base["scenario"], "instruction": base["instruction"],
                                        "response": response}, scenarios_dir, mode="single")
    return {**base, "id": stable_id(base["benchmark"], base["group"], role, position), "mode": "single",
            "role": role, "position": position, "response": response, "length": len(response),
            "prompt": judging.render_prompt(request, scenarios_dir)}


def _pair(base: dict, a: str, b: str, winner: str, position: int, scenarios_dir) -> dict:
    request = judging.request_from_row({"scenario": base["scenario"], "instruction": base["instruction"],
                                        "response_a": a, "response_b": b}, scenarios_dir, mode="pairwise")
    return {**base, "id": stable_id(base["benchmark"], base["group"], "pair", position), "mode": "pairwise",
            "position": position, "response_a": a, "response_b": b, "winner": winner, "length_a": len(a),
            "length_b": len(b), "prompt": judging.render_prompt(request, scenarios_dir),
            "prompt_ba": judging.render_prompt(judging.swap_pair(request), scenarios_dir)}


def item_records(name: str, item: dict, mode: str, scenario: str, row: int, scenarios_dir=None) -> list[dict]:
    """The records a judge answers for one item, in `mode` (pointwise or pairwise)."""
    base = {"benchmark": name, "row": row, "group": item["group"], "subset": item["subset"],
            "scenario": scenario, "instruction": item["instruction"]}
    if "chosen" in item:  # best-of-n
        if mode == "pointwise" or item["subset"] == TIES:
            completions = [("chosen", c) for c in item["chosen"]] + [("rejected", r) for r in item["rejected"]]
            return [_pointwise(base, role, i, text, scenarios_dir) for i, (role, text) in enumerate(completions)]
        out = []
        for j, rejected in enumerate(item["rejected"]):
            # The chosen side alternates, so a judge that always picks one position scores chance.
            first = int(stable_id(item["group"], j), 16) % 2 == 0
            a, b = (item["chosen"][0], rejected) if first else (rejected, item["chosen"][0])
            out.append(_pair(base, a, b, "A" if first else "B", j, scenarios_dir))
        return out
    if mode == "pointwise":
        return [{**_pointwise(base, side, k, item[f"response_{side.lower()}"], scenarios_dir), "winner": item["winner"]}
                for k, side in enumerate("AB")]
    return [_pair(base, item["response_a"], item["response_b"], item["winner"], 0, scenarios_dir)]


def prepare_rows(rows, name: str, fc, scenarios_dir=None) -> tuple[pa.Table, pa.Table]:
    """`records.UserRow`s of benchmark `name` -> (records ready to judge, rejects with file:row)."""
    from themis_ray.evaluate.benchmarks import REJECT_SCHEMA

    scenarios = dict(fc.scenarios or {})
    good, bad = [], []
    for user in rows:
        try:
            if user.error:
                raise ValueError(user.error)
            item = parse_item(name, user.record, user.file, user.row)
            scenario = scenarios.get(item["subset"], fc.scenario)
            good += item_records(name, item, fc.mode, scenario, user.row, scenarios_dir)
        except (ValueError, KeyError) as err:
            msg = err.args[0] if isinstance(err, KeyError) else str(err)
            bad.append({"benchmark": name, "file": user.file, "row": user.row, "id": None, "raw": user.raw,
                        REJECT: f"{user.where}: {msg}"})
    return pa.Table.from_pylist(good, schema=RECORD_SCHEMA), pa.Table.from_pylist(bad, schema=REJECT_SCHEMA)


def _prepare(batch: pa.Table, name: str, fc, scenarios_dir) -> tuple[pa.Table, pa.Table]:
    from themis_ray.records import user_rows

    return prepare_rows(user_rows(batch), name, fc, scenarios_dir)


def field_benchmark(name: str, fc, scenarios_dir: Optional[str] = None):
    """Benchmark `name` from the files at `evaluate.<name>.path`, as lazy datasets read by Ray tasks."""
    import ray

    from themis_ray.evaluate.benchmarks import Benchmark, split_prepared
    from themis_ray.executor import map_tasks
    from themis_ray.records import read_file_batches

    files = field_files(name, fc.path, fc.split)
    rows = map_tasks(ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files)),
                     read_file_batches)
    if fc.limit:
        rows = rows.limit(int(fc.limit))
    records, rejects = split_prepared(rows, _prepare, name=name, fc=fc, scenarios_dir=scenarios_dir)
    pairs = fc.mode == "pairwise"
    source = (f"{HF_DATASETS[name]} from {fc.path} ({len(files)} file{'s' * (len(files) > 1)}), judged "
              f"{fc.mode}" + (" in both orders" if pairs else "") + f"; scored by {RULES[name]}")
    return Benchmark(name, "field", records, rejects, RECORD_SCHEMA, source=source, pairs=pairs)


RULES = {
    "rewardbench2": "RewardBench 2's best-of-n rule (chosen strictly above every rejected; a shared top "
                    "earns 1/k) and its Ties rule, overall = mean of the subsets",
    "judgebench": "JudgeBench's rule (both orders; right more often than wrong)",
    "mtbench_human": "agreement with each human vote (a flip is a tie), with and without ties",
    "hhh": "accuracy against the HHH choice (both orders, a flip is a tie)",
}


# ------------------------------------------------------------------------------------- scoring


def best_of_n(scores: list[float]) -> float:
    """RewardBench 2: `scores[0]` is the chosen completion's; 1 if it is strictly the highest, 1/k if
    it shares the highest with k-1 others, else 0; chance (1/n) when any score is missing."""
    values = np.asarray(scores, dtype=float)
    if np.isnan(values).any():
        return 1.0 / len(values)
    top = values.max()
    return float(1.0 / np.sum(values == top)) if values[0] == top else 0.0


def best_of_n_pairwise(outcomes: list[Optional[str]]) -> float:
    """The best-of-n rule from pairwise comparisons of the chosen completion with each rejected one:
    each outcome "win", "loss", "tie" or None (unparsed). A loss loses the prompt; otherwise it is
    shared with the ties, 1/(1 + ties); an unparsed comparison gives chance, 1/(n + 1)."""
    if any(o is None for o in outcomes):
        return 1.0 / (len(outcomes) + 1)
    if "loss" in outcomes:
        return 0.0
    return 1.0 / (1 + outcomes.count("tie"))


def ties_prompt_stats(correct: list[float], incorrect: list[float]) -> tuple[bool, Optional[float], float]:
    """(every correct answer above the best incorrect one, spread among correct answers or None,
    worst correct minus best incorrect), as RewardBench 2 computes them per Ties prompt."""
    spread = max(correct) - min(correct) if len(correct) > 1 else None
    margin = min(correct) - max(incorrect)
    return margin > 0, spread, margin


def ties_score(prompts: dict[str, tuple[list[float], list[float]]]) -> float:
    """RewardBench 2's Ties score from {"ref:<n>" | "tied:<n>": (correct scores, incorrect scores)}:
    0.3 tied accuracy + 0.3 ref accuracy + 0.2 P(correct-incorrect margin > correct spread) + 0.2 the
    same with the smaller of the tied and ref margins + 0.01 mean tanh(margin / spread - 1)."""
    ref, tied = {}, {}
    for key, (correct, incorrect) in prompts.items():
        kind, number = key.split(":", 1)
        (ref if kind == "ref" else tied)[number] = ties_prompt_stats(correct, incorrect)
    ref_accuracy = float(np.mean([s[0] for s in ref.values()])) if ref else 0.0
    tied_accuracy = float(np.mean([s[0] for s in tied.values()])) if tied else 0.0
    both = sorted(set(ref) & set(tied))
    spread = np.array([tied[p][1] if tied[p][1] is not None else np.nan for p in both], dtype=float)
    margin_tied = np.array([tied[p][2] for p in both], dtype=float)
    margin_ref = np.array([ref[p][2] for p in both], dtype=float)
    with np.errstate(all="ignore"):
        preferred = float(np.mean(margin_tied > spread)) if both else 0.0
        preferred_hard = float(np.mean(np.minimum(margin_ref, margin_tied) > spread)) if both else 0.0
        margin_terms = np.nan_to_num(np.tanh(np.minimum(margin_ref, margin_tied) / spread - 1), nan=0.0)
    margin_score = float(np.mean(margin_terms)) if both else 0.0
    return 0.30 * tied_accuracy + 0.30 * ref_accuracy + 0.20 * preferred + 0.20 * preferred_hard + 0.01 * margin_score


def judgebench_correct(verdict_ab: Optional[str], verdict_ba: Optional[str], label: str) -> bool:
    """JudgeBench: the two decisions (the second unswapped) count +1 when right, -1 when the opposite
    of the label, 0 for a tie or nothing; correct when the sum is positive."""
    opposite = judging.unswap_verdict(label)
    counter = sum(1 if d == label else -1 if d == opposite else 0 for d in (verdict_ab, judging.unswap_verdict(verdict_ba)))
    return counter > 0


def _score_value(df: pd.DataFrame) -> pd.Series:
    """The score a pointwise record is compared by: the expected (probability-weighted) score where the
    judge gave one, else its score; NaN where it gave neither."""
    if "predicted_score" not in df:  # a purely pairwise set
        return pd.Series(np.nan, index=df.index, dtype=float)
    score = pd.to_numeric(df["predicted_score"], errors="coerce")
    if "predicted_expected" in df:
        score = pd.to_numeric(df["predicted_expected"], errors="coerce").fillna(score)
    return score.astype(float)


def _outcome(verdict: Optional[str], chosen_side: str) -> Optional[str]:
    if verdict not in ("A", "B", "C"):
        return None
    return "tie" if verdict == "C" else "win" if verdict == chosen_side else "loss"


def _combined(df: pd.DataFrame) -> pd.Series:
    """Per pairwise record: the verdict from both orders (a flip is a tie; None when either is unparsed)."""
    out = []
    for ab, ba in zip(df["verdict_ab"], df["verdict_ba"]):
        ab = ab if ab in ("A", "B", "C") else None
        ba = ba if ba in ("A", "B", "C") else None
        out.append(None if ab is None or ba is None else judging.combine_pairwise(ab, ba)[0])
    return pd.Series(out, index=df.index, dtype=object)


def pair_outcomes(df: pd.DataFrame) -> pd.DataFrame:
    """Graded records of a pair set -> one row per pair: group, subset, winner (gold), verdict (combined),
    verdict_ab, verdict_ba (unswapped), consistent. Pointwise records: the higher-scored side wins."""
    if df.empty:
        return pd.DataFrame(columns=["group", "subset", "winner", "verdict", "verdict_ab", "verdict_ba", "consistent"])
    pairs = df[df["mode"] == "pairwise"]
    rows = []
    if len(pairs):
        combined = _combined(pairs)
        for (_, r), verdict in zip(pairs.iterrows(), combined):
            ab = r["verdict_ab"] if r["verdict_ab"] in ("A", "B", "C") else None
            ba = judging.unswap_verdict(r["verdict_ba"])
            rows.append({"group": r["group"], "subset": r["subset"], "winner": r["winner"], "verdict": verdict,
                         "verdict_ab": ab, "verdict_ba": ba, "consistent": ab is not None and ab == ba})
    sides = df[df["mode"] != "pairwise"].assign(_value=lambda d: _score_value(d))
    for group, g in sides.groupby("group", sort=False):
        a, b = g[g["role"] == "A"]["_value"], g[g["role"] == "B"]["_value"]
        if len(a) != 1 or len(b) != 1:
            continue
        x, y = float(a.iloc[0]), float(b.iloc[0])
        verdict = None if math.isnan(x) or math.isnan(y) else "A" if x > y else "B" if y > x else "C"
        rows.append({"group": group, "subset": g["subset"].iloc[0], "winner": g["winner"].iloc[0],
                     "verdict": verdict, "verdict_ab": verdict, "verdict_ba": verdict, "consistent": None})
    return pd.DataFrame(rows)


def rewardbench2_items(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Graded RewardBench 2 records -> (one row per non-Ties prompt: group, subset, result, parsed;
    the Ties prompts' {id: (correct scores, incorrect scores)} with any unparsed prompt left out, and
    the count of Ties prompts and parsed ones)."""
    items, ties, ties_n = [], {}, [0, 0]
    points = df[df["mode"] != "pairwise"].assign(_value=lambda d: _score_value(d))
    for group, g in points.groupby("group", sort=False):
        g = g.sort_values("position")
        chosen = g[g["role"] == "chosen"]["_value"].tolist()
        rejected = g[g["role"] == "rejected"]["_value"].tolist()
        parsed = not any(math.isnan(v) for v in chosen + rejected)
        if g["subset"].iloc[0] == TIES:
            ties_n[0] += 1
            if parsed:
                ties_n[1] += 1
                ties[str(group)] = (chosen, rejected)
            continue
        items.append({"group": group, "subset": g["subset"].iloc[0], "result": best_of_n(chosen[:1] + rejected),
                      "parsed": parsed})
    pairs = df[df["mode"] == "pairwise"]
    if len(pairs):
        pairs = pairs.assign(_verdict=_combined(pairs))
        for group, g in pairs.groupby("group", sort=False):
            outcomes = [_outcome(v, w) for v, w in zip(g["_verdict"], g["winner"])]
            items.append({"group": group, "subset": g["subset"].iloc[0], "result": best_of_n_pairwise(outcomes),
                          "parsed": None not in outcomes})
    frame = pd.DataFrame(items, columns=["group", "subset", "result", "parsed"])
    return frame, {"prompts": ties, "n": ties_n[0], "n_parsed": ties_n[1]}


def _ci(values: np.ndarray, labels: np.ndarray, fn, n_boot: int, confidence: float, seed: int) -> Optional[list]:
    from themis_ray.evaluate import metrics as M

    if n_boot <= 0 or not len(values):
        return None
    return list(M.bootstrap_ci(values, labels, fn, n=n_boot, alpha=1 - confidence, seed=seed))


def _mean(x, _labels=None) -> float:
    x = np.asarray(x, dtype=float)
    return float(x.mean()) if len(x) else math.nan


def _spread(values) -> dict:
    from themis_ray.evaluate import metrics as M

    return M.score_spread(values)


def rewardbench2_summary(df: pd.DataFrame, n_boot: int = 0, confidence: float = 0.95, seed: int = 0) -> dict:
    items, ties = rewardbench2_items(df)
    by_subset = {}
    for subset, g in items.groupby("subset", sort=True):
        by_subset[subset] = {"n": len(g), "parse_rate": float(g["parsed"].mean()), "score": _mean(g["result"]),
                             "score_ci": _ci(g["result"].to_numpy(float), g["subset"].to_numpy(object), _mean,
                                             n_boot, confidence, seed)}
    ties_value = None
    if ties["n"]:
        ties_value = ties_score(ties["prompts"]) if ties["prompts"] else 0.0
        by_subset[TIES] = {"n": ties["n"], "parse_rate": ties["n_parsed"] / ties["n"], "score": ties_value,
                           "score_ci": None}
    subsets = [s for s in by_subset if s != TIES]

    def overall(values, labels):
        means = [float(np.mean(values[labels == s])) for s in subsets if np.any(labels == s)]
        return float(np.mean(means + ([ties_value] if ties_value is not None else []))) if means or ties_value \
            is not None else math.nan

    values, labels = items["result"].to_numpy(float), items["subset"].to_numpy(object)
    n = len(items) + ties["n"]
    parsed = int(items["parsed"].sum()) + ties["n_parsed"]
    points = df[df["mode"] != "pairwise"]
    judged = _score_value(points).round() if len(points) else _combined(df[df["mode"] == "pairwise"])
    out = {"n": n, "parse_rate": parsed / n if n else math.nan,
           "score": overall(values, labels) if n else math.nan,
           "score_ci": _ci(values, labels, overall, n_boot, confidence, seed) if len(items) else None,
           **_spread(judged)}
    for subset, m in by_subset.items():
        out[f"score:{subset}"] = m["score"]
    return {"overall": out, "by_scenario": by_subset}


def _pair_metrics(pairs: pd.DataFrame, name: str, n_boot: int, confidence: float, seed: int) -> dict:
    n = len(pairs)
    parsed = pairs["verdict"].notna().to_numpy() if n else np.zeros(0, bool)
    out: dict[str, Any] = {"n": n, "parse_rate": float(parsed.mean()) if n else math.nan}
    consistent = pairs["consistent"] if n else pd.Series(dtype=object)
    out["position_consistency"] = float(consistent.astype(bool).mean()) if n and consistent.notna().all() else None
    out["tie_rate"] = float((pairs.loc[parsed, "verdict"] == "C").mean()) if parsed.any() else math.nan
    if name == "judgebench":
        correct = np.array([judgebench_correct(a, None if b is None else judging.unswap_verdict(b), w) for a, b, w in
                            zip(pairs["verdict_ab"], pairs["verdict_ba"], pairs["winner"])], dtype=float)
        out["score"] = _mean(correct)
        out["score_ci"] = _ci(correct, correct, _mean, n_boot, confidence, seed)
        single = np.array([a == w for a, w in zip(pairs["verdict_ab"], pairs["winner"])], dtype=float)
        out["score_single_order"] = _mean(single)
    elif name == "mtbench_human":
        verdicts, gold = pairs["verdict"].to_numpy(object), pairs["winner"].to_numpy(object)

        def with_ties(v, g):
            return _mean([a == b for a, b in zip(v, g)])

        def without_ties(v, g):
            keep = [a not in ("C", None) and b != "C" for a, b in zip(v, g)]
            return _mean([a == b for a, b, k in zip(v, g, keep) if k])

        out["agreement"] = with_ties(verdicts, gold) if n else math.nan
        out["agreement_ci"] = _ci(verdicts, gold, with_ties, n_boot, confidence, seed)
        out["agreement_without_ties"] = without_ties(verdicts, gold) if n else math.nan
        out["agreement_without_ties_ci"] = _ci(verdicts, gold, without_ties, n_boot, confidence, seed)
        out["n_without_ties"] = int(sum(a not in ("C", None) and b != "C" for a, b in zip(verdicts, gold)))
    else:
        correct = np.array([v == w for v, w in zip(pairs["verdict"], pairs["winner"])], dtype=float)
        out["accuracy"] = _mean(correct)
        out["accuracy_ci"] = _ci(correct, correct, _mean, n_boot, confidence, seed)
    out.update(_spread(pairs["verdict"] if n else []))
    return out


def pair_summary(name: str, df: pd.DataFrame, n_boot: int = 0, confidence: float = 0.95, seed: int = 0) -> dict:
    """JudgeBench, MT-Bench human or HHH: the headline figures overall and per subset."""
    pairs = pair_outcomes(df)
    by_subset = {s: _pair_metrics(g, name, 0, confidence, seed) for s, g in pairs.groupby("subset", sort=True)} \
        if len(pairs) else {}
    return {"overall": _pair_metrics(pairs, name, n_boot, confidence, seed), "by_scenario": by_subset}


HEADLINE = {
    "rewardbench2": ["score", "score_ci"],
    "judgebench": ["score", "score_ci", "score_single_order", "position_consistency", "tie_rate"],
    "mtbench_human": ["agreement", "agreement_ci", "agreement_without_ties", "agreement_without_ties_ci",
                      "n_without_ties", "position_consistency", "tie_rate"],
    "hhh": ["accuracy", "accuracy_ci", "position_consistency", "tie_rate"],
}
SUBSET_COLUMNS = {"rewardbench2": ["n", "parse_rate", "score"],
                  "judgebench": ["n", "parse_rate", "score", "position_consistency"],
                  "mtbench_human": ["n", "parse_rate", "agreement", "agreement_without_ties", "position_consistency"],
                  "hhh": ["n", "parse_rate", "accuracy", "position_consistency"]}


def headline_columns(name: str, summaries: dict) -> list[str]:
    columns = ["n", "parse_rate"] + HEADLINE[name]
    if name == "rewardbench2":
        subsets = sorted({k for s in summaries.values() for k in s["overall"] if k.startswith("score:")})
        columns += subsets
    return columns + ["score_entropy", "collapsed"]


# ----------------------------------------------------------------------------------- baselines


def baseline_frames(df: pd.DataFrame, scale=(1, 5), seed: int = 0) -> dict[str, pd.DataFrame]:
    """One judge's graded records with the predictions of the baselines instead: random (a uniform
    score on the scale; a uniform A/B/tie verdict in each order) and always-longer (the length as the
    score; the longer response in both orders, a tie on equal lengths)."""
    rng = np.random.default_rng(seed)
    df = df.sort_values("id").reset_index(drop=True)
    pairwise = (df["mode"] == "pairwise").to_numpy()
    random, longer = df.copy(), df.copy()
    uniform = rng.uniform(float(scale[0]), float(scale[1]), size=len(df))
    draws = rng.choice(np.array(["A", "B", "C"], dtype=object), size=(2, len(df)))
    for frame in (random, longer):
        frame["predicted_expected"] = np.nan
        if "verdict_ab" in frame:
            frame["verdict_ab"] = frame["verdict_ba"] = None
    random["predicted_score"] = np.where(pairwise, np.nan, uniform)
    length = pd.to_numeric(df.get("length"), errors="coerce") if "length" in df else pd.Series(np.nan, index=df.index)
    longer["predicted_score"] = np.where(pairwise, np.nan, length.to_numpy(float))
    if pairwise.any():
        la = pd.to_numeric(df["length_a"], errors="coerce").to_numpy(float)
        lb = pd.to_numeric(df["length_b"], errors="coerce").to_numpy(float)
        side = np.where(la > lb, "A", np.where(lb > la, "B", "C")).astype(object)
        random["verdict_ab"] = np.where(pairwise, draws[0], None)
        random["verdict_ba"] = np.where(pairwise, draws[1], None)
        longer["verdict_ab"] = np.where(pairwise, side, None)
        longer["verdict_ba"] = np.where(pairwise, [judging.unswap_verdict(s) for s in side], None)
    return dict(zip(BASELINES, (random, longer)))


def summarize_field(benchmark, graded: dict[str, pd.DataFrame], n_boot: int = 0, confidence: float = 0.95,
                    seed: int = 0) -> dict[str, dict]:
    """Judge -> its summary of a field benchmark, then the baselines scored by the same rule."""
    name = benchmark.name

    def one(df):
        if name == "rewardbench2":
            return rewardbench2_summary(df, n_boot, confidence, seed)
        return pair_summary(name, df, n_boot, confidence, seed)

    out = {judge: one(df) for judge, df in graded.items()}
    first = next((df for df in graded.values() if len(df)), None)
    if first is not None:
        for baseline, frame in baseline_frames(first, tuple(benchmark.scale), seed).items():
            out[baseline] = one(frame)
    return out

