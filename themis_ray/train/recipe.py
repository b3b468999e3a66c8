"""Supervised fine-tuning of the judge: Ray Train's TorchTrainer running DeepSpeed ZeRO-3.

The driver (`train_judge`) tokenizes every record, rejects the too-long ones, deals the rest to
ranks (packing each rank's records into sequences when `train.packing` is on) and fixes the step
plan; each worker (`_train_worker`) then trains on its shard, with the loss of `losses.judge_loss`,
and all ranks export the weights together. ZeRO-3 runs collectives inside every forward and
backward, so every rank must run exactly the same number of micro-batches or the group hangs: the
plan is computed once, on the driver.

Every `checkpoint_every` optimizer steps each rank writes its DeepSpeed ZeRO-3 shard and reports
it through `ray.train.report`, which merges the ranks' files into one checkpoint folder. When a
worker dies, Ray Train (`FailureConfig(max_failures)`) restarts the group; each rank then loads the
latest checkpoint, skips the micro-batches it had already consumed (the batch stream is
deterministic) and goes on, so the run ends with the planned number of optimizer steps.

Assumption: workers write the judge straight into `output_dir`, so on a multi-node cluster it must
be on storage that every node shares (as must the base model folder and `ray_train/`).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from themis_ray.train.collate import Example, collate_sequences, encode_records, pack
from themis_ray.train.losses import judge_loss

METRICS_FILE = "train_metrics.jsonl"  # written next to the judge folder, one line per step
LOSS_PLOT = "train_loss.png"
CHECKPOINT_TAG = "zero3"  # one DeepSpeed tag per Ray checkpoint folder
# "RANK:STEP:MARKER": that rank exits hard once, after optimizer step STEP, unless MARKER exists
# (it writes MARKER first, so the restarted run does not die again). For fault-tolerance tests.
FAULT_ENV = "THEMIS_TRAIN_FAULT"
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


def plan_steps(n_records: int, cfg: Any, longest_shard: int | None = None) -> StepPlan:
    """The same plan for every rank: accumulation reaches the global batch whatever the workers.

    `longest_shard`: the most sequences any rank holds (packed shards differ in size); an epoch is
    the steps that rank needs, and shorter shards wrap around. Default: records dealt evenly."""
    if n_records < cfg.num_workers:
        raise ValueError(f"{n_records} trainable records for {cfg.num_workers} workers: every rank needs one")
    grad_accum = max(1, cfg.global_batch_size // (cfg.micro_batch_size * cfg.num_workers))
    per_rank_step = cfg.micro_batch_size * grad_accum
    longest = longest_shard if longest_shard is not None else math.ceil(n_records / cfg.num_workers)
    total_steps = cfg.epochs * math.ceil(longest / per_rank_step)
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


def micro_batches(shard: list[Any], size: int, seed: int, rank: int) -> Iterator[list[Any]]:
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
    # ZeRO-3 calls torch's old collective names on every gather: one deprecation line per call
    # would bury the training log.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, get_scheduler

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
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

    # Resume: weights, optimizer, schedule and step count from the latest reported checkpoint.
    done = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            _, client_state = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        done = int(client_state["step"])

    shard = ray.get(config["shards"])[rank]
    batches = micro_batches(shard, plan.micro_batch_size, config["seed"], rank)
    for _ in range(done * plan.grad_accum):
        next(batches)  # the stream is deterministic: skip what the checkpointed steps consumed
    log = _open_metrics(Path(config["metrics_path"]), done) if rank == 0 else None
    sim_weight = config["sim_loss_weight"]
    fault = _fault(config.get("fault"), rank)
    loss = None
    totals = torch.zeros(4, dtype=torch.float64)  # real tokens, tensor tokens, seconds, steps

    for step in range(done + 1, plan.total_steps + 1):
        start = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        # The Sim loss compares against the embedding matrix, which ZeRO-3 keeps partitioned: gather
        # it once per optimizer step (a collective on every rank) as a fixed target space.
        table = _gathered_embeddings(engine) if sim_weight > 0 else None
        # Summed over micro-batches, then over ranks: loss, ce, sft, sim sums and counts, tokens.
        stats = torch.zeros(10, dtype=torch.float64)
        for _ in range(plan.grad_accum):
            batch = collate_sequences(next(batches), tokenizer.pad_token_id)
            real, labels, kinds = batch.pop("real_tokens"), batch.pop("labels"), batch.pop("kinds")
            inputs = {k: v.to(engine.device) for k, v in batch.items()}
            # No KV cache: with one, transformers would not read restarting position ids as packing.
            out = engine(**inputs, use_cache=False)
            micro_loss, parts = judge_loss(
                out.logits, labels.to(engine.device), kinds.to(engine.device), table, sim_weight
            )
            engine.backward(micro_loss)  # DeepSpeed scales by 1/grad_accum itself
            engine.step()  # applies the update only at the accumulation boundary
            stats += torch.tensor([
                micro_loss.item(), 1, parts["ce_sum"], parts["ce_n"], parts["sft_sum"], parts["sft_n"],
                parts["sim_sum"], parts["sim_n"], real, labels.numel(),
            ], dtype=torch.float64)
        # One small all-reduce gives rank 0 the group's losses and token counts.
        stats = stats.to(engine.device)
        dist.all_reduce(stats)
        stats = stats.cpu()
        elapsed = time.perf_counter() - start
        loss = stats[0].item() / stats[1].item()
        totals += torch.tensor([stats[8].item(), stats[9].item(), elapsed, 1], dtype=torch.float64)
        row = {
            "step": step,
            "loss": loss,
            "ce_loss": _ratio(stats[2], stats[3]),
            "sft_loss": _ratio(stats[4], stats[5]),
            "sim_loss": _ratio(stats[6], stats[7]) if sim_weight > 0 else None,
            "sft_tokens": int(stats[5]),
            "sim_tokens": int(stats[7]),
            "lr": lr,
            "tokens_per_s": stats[8].item() / elapsed,
            "packing_efficiency": stats[8].item() / stats[9].item(),
        }
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
        if fault and step == fault[0]:
            fault[1].write_text(f"rank {rank} exited after step {step}\n")
            os._exit(1)  # a hard crash, as a killed or preempted worker
        if config["checkpoint_every"] and step % config["checkpoint_every"] == 0 and step < plan.total_steps:
            # Each rank writes its own shard; Ray merges the ranks' folders into one checkpoint.
            # report() is a barrier costing ~1.7 s on CPU, hence every N steps and not every step.
            with tempfile.TemporaryDirectory(prefix="themis-ckpt-") as folder:
                engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state={"step": step})
                checkpoint = ray.train.Checkpoint.from_directory(folder)
                ray.train.report({"step": step, "loss": loss}, checkpoint=checkpoint)
    if log:
        log.close()

    # Gathering the ZeRO-3 shards is a collective: every rank calls it, only rank 0 gets weights.
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        _export(engine.module, state_dict, tokenizer, Path(config["output_dir"]))
    real, tensor, seconds, steps_here = totals.tolist()
    summary = {
        "steps": plan.total_steps,
        "optimizer_steps": int(engine.global_steps),  # restored from the checkpoint on a restart
        "resumed_from_step": done,
        "final_loss": loss,
        # this attempt's throughput: every rank's real tokens per second of step time
        "tokens_per_s": real / seconds if seconds else 0.0,
        "packing_efficiency": real / tensor if tensor else 0.0,
    }
    ray.train.report(summary)  # also a barrier: no rank leaves before the export is written
    return summary if rank == 0 else None


def _ratio(total: Any, count: Any) -> float | None:
    return float(total) / float(count) if float(count) else None


def _gathered_embeddings(engine: Any) -> Any:
    import deepspeed

    weight = engine.module.get_input_embeddings().weight
    with deepspeed.zero.GatheredParameters([weight]):
        return weight.detach().clone()


def _open_metrics(path: Path, done: int):
    """The metrics file, truncated to the steps a restart keeps (those up to its checkpoint)."""
    kept = []
    if done and path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= done]
    log = path.open("w")
    log.writelines(line + "\n" for line in kept)
    return log


def _fault(spec: str | None, rank: int) -> tuple[int, Path] | None:
    if not spec:
        return None
    fault_rank, step, marker = spec.split(":", 2)
    if int(fault_rank) != rank or Path(marker).exists():
        return None
    return int(step), Path(marker)


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """Loss per step (total and by objective) as a PNG beside the metrics file."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in rows]
    for key, label in (("loss", "loss"), ("sft_loss", "SFT tokens: cross-entropy"),
                       ("sim_loss", "Sim tokens: 1 - cos")):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax.plot(steps, [float("nan") if v is None else v for v in values], marker=".", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("judge fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    return out


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


def shard_sequences(
    examples: list[Example], num_workers: int, packing: bool, max_length: int
) -> list[list[list[Example]]]:
    """Deal the examples to ranks, then make each rank's training sequences: one example each, or
    packed several to a sequence of at most `max_length` tokens (packed per rank, so every rank
    with a record has a sequence)."""
    shards = [examples[rank::num_workers] for rank in range(num_workers)]
    if packing:
        return [pack(shard, max_length) for shard in shards]
    return [[[e] for e in shard] for shard in shards]


def train_judge(records: Any, base_model_dir: str, output_dir: Path, cfg: Any) -> dict:
    """Fine-tune `base_model_dir` on (prompt -> evaluation) records; save the judge to `output_dir`.

    `records`: dicts (or a ray.data.Dataset) with string fields id, prompt, evaluation.
    Returns a summary: steps, optimizer_steps, resumed_from_step, records, sequences, rejected,
    first_loss, final_loss, tokens_per_s, packing_efficiency, judge_dir, metrics, loss_plot, wall_s.
    Metrics per step go to `train_metrics.jsonl` beside `output_dir`, the loss plot to `train_loss.png`.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    started = time.time()
    output_dir = Path(output_dir).expanduser().resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    extensions_dir = os.path.expanduser(cfg.torch_extensions_dir)
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir  # for anything DeepSpeed builds in the driver
    if not 0.0 <= cfg.sim_loss_weight <= 1.0:
        raise ValueError(f"train.sim_loss_weight must be within [0, 1], got {cfg.sim_loss_weight}")

    if not Path(base_model_dir).expanduser().is_dir():
        raise FileNotFoundError(
            f"train.model: base model folder not found: {base_model_dir} (a local Hugging Face folder, "
            "on storage every node can read)"
        )
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    examples, rejected = encode_records(_as_records(records), tokenizer, cfg.max_length)
    if not examples:
        raise ValueError(f"no trainable records: all {len(rejected)} were rejected")
    shards = shard_sequences(examples, cfg.num_workers, cfg.packing, cfg.max_length)
    plan = plan_steps(len(examples), cfg, longest_shard=max(len(s) for s in shards))
    metrics_path = output_dir.parent / METRICS_FILE

    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "plan": asdict(plan),
            "ds_config": deepspeed_config(cfg, plan),
            "shards": ray.put(shards),  # one copy in the object store, not one per worker config
            "base_model_dir": str(base_model_dir),
            "output_dir": str(output_dir),
            "metrics_path": str(metrics_path),
            "torch_extensions_dir": extensions_dir,
            "use_gpu": bool(cfg.use_gpu),
            "learning_rate": float(cfg.learning_rate),
            "weight_decay": float(cfg.weight_decay),
            "sim_loss_weight": float(cfg.sim_loss_weight),
            "checkpoint_every": int(cfg.checkpoint_every),
            "seed": int(cfg.seed),
            "fault": os.environ.get(FAULT_ENV),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": 1}
        ),
        # A fresh name per call: reusing one would make Ray Train restore that run's state.
        run_config=RunConfig(
            storage_path=str(output_dir.parent / "ray_train"),
            name=f"train_judge-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.checkpoints_to_keep)),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()  # raises ray.train.TrainingFailedError once restarts are used up
    steps = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    plot = plot_losses(metrics_path, output_dir.parent / LOSS_PLOT)
    return {
        **result.return_value,
        "first_loss": steps[0]["loss"] if steps else None,
        "records": len(examples),
        "sequences": sum(len(s) for s in shards),
        "rejected": rejected,
        "global_batch": plan.global_batch,
        "judge_dir": str(output_dir),
        "metrics": str(metrics_path),
        "loss_plot": str(plot) if plot else None,
        "wall_s": round(time.time() - started, 2),
    }
