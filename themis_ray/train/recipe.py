"""Supervised fine-tuning of the judge: Ray Train's TorchTrainer running DeepSpeed ZeRO-3.

The driver (`train_judge`) tokenizes every record, rejects the too-long ones and fixes the step
plan; each worker (`_train_worker`) then trains on its shard and all ranks export the weights
together. ZeRO-3 runs collectives inside every forward and backward, so every rank must run exactly
the same number of micro-batches or the group hangs: the plan is computed once, on the driver.

Assumption: workers write the judge straight into `output_dir`, so on a multi-node cluster it must
be on storage that every node shares (as must the base model folder and `ray_train/`).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from themis_ray.train.collate import Example, collate, encode_records

REPORT_EVERY = 50  # ray.train.report is a barrier costing ~1.7 s on CPU: report seldom
METRICS_FILE = "train_metrics.jsonl"  # written next to the judge folder, one line per step
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class StepPlan:
    num_workers: int
    micro_batch_size: int
    grad_accum: int
    total_steps: int
    warmup_steps: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.num_workers * self.grad_accum

    @property
    def micro_batches_per_rank(self) -> int:
        return self.total_steps * self.grad_accum


def plan_steps(n_records: int, cfg: Any) -> StepPlan:
    """The same plan for every rank: accumulation reaches the global batch whatever the workers."""
    if n_records < cfg.num_workers:
        raise ValueError(f"{n_records} trainable records for {cfg.num_workers} workers: every rank needs one")
    grad_accum = max(1, cfg.global_batch_size // (cfg.micro_batch_size * cfg.num_workers))
    per_step = cfg.micro_batch_size * cfg.num_workers * grad_accum
    total_steps = cfg.epochs * math.ceil(n_records / per_step)
    return StepPlan(
        num_workers=cfg.num_workers,
        micro_batch_size=cfg.micro_batch_size,
        grad_accum=grad_accum,
        total_steps=total_steps,
        warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),  # as transformers' Trainer rounds
    )


def deepspeed_config(cfg: Any, plan: StepPlan) -> dict:
    """The JSON file's ZeRO settings, with the batch shape and precision filled in from TrainConfig
    (plain DeepSpeed does not resolve the "auto" values that transformers' integration does)."""
    path = Path(os.path.expanduser(cfg.deepspeed_config))
    if not path.is_absolute():
        path = path if path.is_file() else PROJECT_ROOT / path  # the cwd first, then the project root
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {cfg.deepspeed_config}")
    ds = json.loads(path.read_text())
    if ds.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError(f"{path}: this recipe exports with ZeRO-3 collectives; set zero_optimization.stage=3")
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds["train_batch_size"] = plan.global_batch
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = 1.0
    ds["bf16"] = {"enabled": bool(cfg.use_gpu)}  # CPU kernels and gloo are fastest and safest in fp32
    ds["fp16"] = {"enabled": False}
    ds["zero_force_ds_cpu_optimizer"] = False  # we pass torch's AdamW: no cpu_adam compile
    return ds


def micro_batches(shard: list[Example], size: int, seed: int, rank: int) -> Iterator[list[Example]]:
    """An endless stream of micro-batches over this rank's shard, reshuffled every epoch."""
    epoch, batch = 0, []
    while True:
        order = list(range(len(shard)))
        random.Random(f"{seed}:{rank}:{epoch}").shuffle(order)  # str seeds are hashed stably
        for i in order:
            batch.append(shard[i])
            if len(batch) == size:
                yield batch
                batch = []
        epoch += 1


def load_base_model(base_model_dir: str, dtype: Any = None) -> Any:
    """The base model as plain weights. The embedded default was converted from GGUF and its config
    still names the GGUF quantizer; dropping it makes the exported judge a plain HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model_dir)
    quant = getattr(config, "quantization_config", None)
    if quant is not None and _quant_method(quant) == "gguf":
        del config.quantization_config
    return AutoModelForCausalLM.from_pretrained(base_model_dir, config=config, dtype=dtype or torch.float32)


def _quant_method(quant: Any) -> str:
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", "")
    return str(getattr(method, "value", method))


def _train_worker(config: dict) -> dict | None:
    # DeepSpeed JIT-compiles its shm_comm op on first use; a persistent cache makes that once ever.
    os.environ["TORCH_EXTENSIONS_DIR"] = config["torch_extensions_dir"]
    import deepspeed
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, get_scheduler

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = StepPlan(**config["plan"])
    # Ray Train already made the process group; DeepSpeed adopts it instead of making another.
    deepspeed.init_distributed(dist_backend="nccl" if config["use_gpu"] else "gloo")
    torch.manual_seed(config["seed"])

    tokenizer = AutoTokenizer.from_pretrained(config["base_model_dir"])
    model = load_base_model(config["base_model_dir"])
    model.config.use_cache = False  # no KV cache while training
    # No weight decay on norms (1-D weights): decaying them toward zero only hurts.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config["learning_rate"])
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        # A callable, so the schedule wraps the optimizer DeepSpeed actually steps.
        lr_scheduler=lambda opt: get_scheduler(
            "linear", opt, num_warmup_steps=plan.warmup_steps, num_training_steps=plan.total_steps
        ),
        config=config["ds_config"],
    )

    examples = ray.get(config["examples"])
    batches = micro_batches(examples[rank::world], plan.micro_batch_size, config["seed"], rank)
    metrics_path = Path(config["metrics_path"])
    log = metrics_path.open("w") if rank == 0 else None
    first_loss = loss = None
    tokens_total, train_s = 0, 0.0

    for step in range(1, plan.total_steps + 1):
        start = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        loss_sum, tokens = 0.0, 0
        for _ in range(plan.grad_accum):
            batch = {k: v.to(engine.device) for k, v in collate(next(batches), tokenizer.pad_token_id).items()}
            out = engine(**batch)
            engine.backward(out.loss)  # DeepSpeed scales by 1/grad_accum itself
            engine.step()  # applies the update only at the accumulation boundary
            loss_sum += out.loss.item()
            tokens += int(batch["attention_mask"].sum())
        # One small all-reduce gives rank 0 the mean loss and token count of the whole group.
        stats = torch.tensor([loss_sum, plan.grad_accum, tokens], dtype=torch.float64, device=engine.device)
        dist.all_reduce(stats)
        elapsed = time.perf_counter() - start
        loss = stats[0].item() / stats[1].item()
        first_loss = loss if first_loss is None else first_loss
        tokens_total += int(stats[2].item())
        train_s += elapsed
        if log:
            row = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": stats[2].item() / elapsed}
            log.write(json.dumps(row) + "\n")
            log.flush()
        if step % REPORT_EVERY == 0 and step < plan.total_steps:
            ray.train.report({"step": step, "loss": loss})  # every rank: it is a barrier
    if log:
        log.close()

    # Gathering the ZeRO-3 shards is a collective: every rank calls it, only rank 0 gets weights.
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        _export(engine.module, state_dict, tokenizer, Path(config["output_dir"]))
    summary = {
        "steps": plan.total_steps,
        "first_loss": first_loss,
        "final_loss": loss,
        "tokens_per_s": tokens_total / train_s if train_s else 0.0,
    }
    ray.train.report(summary)  # also a barrier: no rank leaves before the export is written
    return summary if rank == 0 else None


def _export(model: Any, state_dict: dict, tokenizer: Any, output_dir: Path) -> None:
    """Save a plain HF folder (weights, config, tokenizer with its chat template), atomically."""
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True  # the judge generates: give it its KV cache back
    # SmolLM2 ties lm_head to embed_tokens: the gathered dict holds the shared weight once (as
    # model.embed_tokens.weight) and tie_word_embeddings in the saved config re-ties it on load.
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)


def _as_records(records: Any) -> list[dict]:
    if hasattr(records, "take_all"):  # a ray.data.Dataset
        records = records.take_all()
    return [{"id": r["id"], "prompt": r["prompt"], "evaluation": r["evaluation"]} for r in records]


def train_judge(records: Any, base_model_dir: str, output_dir: Path, cfg: Any) -> dict:
    """Fine-tune `base_model_dir` on (prompt -> evaluation) records; save the judge to `output_dir`.

    `records`: dicts (or a ray.data.Dataset) with string fields id, prompt, evaluation.
    Returns a summary: steps, records, rejected, first_loss, final_loss, tokens_per_s, judge_dir, wall_s.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    started = time.time()
    output_dir = Path(output_dir).expanduser().resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    extensions_dir = os.path.expanduser(cfg.torch_extensions_dir)
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir  # for anything DeepSpeed builds in the driver

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    examples, rejected = encode_records(_as_records(records), tokenizer, cfg.max_length)
    if not examples:
        raise ValueError(f"no trainable records: all {len(rejected)} were rejected")
    plan = plan_steps(len(examples), cfg)

    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "plan": asdict(plan),
            "ds_config": deepspeed_config(cfg, plan),
            "examples": ray.put(examples),  # one copy in the object store, not one per worker config
            "base_model_dir": str(base_model_dir),
            "output_dir": str(output_dir),
            "metrics_path": str(output_dir.parent / METRICS_FILE),
            "torch_extensions_dir": extensions_dir,
            "use_gpu": bool(cfg.use_gpu),
            "learning_rate": float(cfg.learning_rate),
            "weight_decay": float(cfg.weight_decay),
            "seed": int(cfg.seed),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": 1}
        ),
        # A fresh name per call: reusing one would make Ray Train restore that run's state.
        run_config=RunConfig(
            storage_path=str(output_dir.parent / "ray_train"),
            name=f"train_judge-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        ),
    )
    result = trainer.fit()  # raises ray.train.TrainingFailedError if a worker failed
    return {
        **result.return_value,
        "records": len(examples),
        "rejected": rejected,
        "global_batch": plan.global_batch,
        "judge_dir": str(output_dir),
        "wall_s": round(time.time() - started, 2),
    }
