"""Supervised fine-tuning of the judge: Ray Train's TorchTrainer running DeepSpeed ZeRO-3 on a Ray Dataset.

One loop for every training step of the pipeline: what a micro-batch trains on is an objective
(`objectives.py`): the judge's SFT loss for the train stage, DPO on preference pairs for the prefer
stage, with the same data plane, checkpoints, resume and export.

The records never pass through the driver. `data.prepare_sequences` tokenises (and packs) them in Ray
Data tasks and writes the sequences to the work folder; the driver reads the parts' footers to count
sequences and fixes the step plan from that count; `TorchTrainer(datasets={"train": ...})` splits the
sequences among the ranks with `streaming_split(equal=True)`, each rank pulling only its own blocks
(`ray.train.get_dataset_shard`). ZeRO-3 runs collectives inside every forward and backward, so every
rank must run exactly the same number of micro-batches or the group hangs: the training dataset holds
exactly `plan.rows_per_rank` sequences per rank (epochs, then repeated sequences up to a whole
number of global batches), so every rank's stream yields the same number of full micro-batches.

Each worker builds the base model inside DeepSpeed's ZeRO-3 init context (`train.partitioned_load`,
transformers' `HfDeepSpeedConfig`: parameters are created partitioned, in the training dtype, and
the checkpoint's values copied into each partition), so no rank ever holds the whole model; with
`train.activation_checkpointing` each decoder layer is recomputed in the backward pass. A memory
estimate is printed, and checked against the cluster, before any worker starts (`memory.py`).

Every `checkpoint_every` optimizer steps each rank writes its DeepSpeed ZeRO-3 shard and reports it
through `ray.train.report`, which merges the ranks' files into one checkpoint folder under the run's
storage (`<work>/ray_train/<run name>`). A restart continues from the latest checkpoint: weights,
optimizer, schedule and step count, and each rank skips as many micro-batches of its stream as the
checkpointed steps consumed. That happens when a worker dies (Ray Train restarts the group,
`FailureConfig(max_failures)`) and when the driver dies and the stage runs again with the same
fingerprint (the same storage and run name: Ray Train restores the run from its snapshot). Either
way the run ends with the planned number of optimizer steps. The split of sequences among ranks is
dynamic (Ray Data hands out blocks as ranks ask), so after a restart the exact order of the data
differs from the interrupted run's: the skipped micro-batches are as many as were trained, not
necessarily the same sequences.

Assumption: the base model folder must be readable by every node (shared storage); the judge, the
metrics and the checkpoints go to the stage folder, a local path every node mounts or an object-store
URI.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from themis_ray import fs
from themis_ray.train.objectives import SFTObjective, build_objective

METRICS_FILE = "train_metrics.jsonl"  # one line per step
LOSS_PLOT = "train_loss.png"
RUN_NAME = "train"  # one Ray Train run per work folder: a re-run with the same name restores it
CHECKPOINT_TAG = "zero3"  # one DeepSpeed tag per Ray checkpoint folder
SHUFFLE_BUFFER = 256  # sequences each rank shuffles locally (blocks arrive in a per-epoch order)
OFFLOAD = ("none", "optimizer", "all")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# "RANK:STEP:MARKER": that rank exits hard once, after optimizer step STEP, unless MARKER exists
# (it writes MARKER first, so the restarted run does not die again). For fault-tolerance tests.
FAULT_ENV = "THEMIS_TRAIN_FAULT"
# "STEP:MARKER": rank 0 stops making progress after step STEP (and its checkpoint), unless MARKER
# exists (it writes MARKER first), so a test can kill the driver mid-run at a known point.
HANG_ENV = "THEMIS_TRAIN_HANG"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Per-rank memory figures a worker reports (bytes; the summary gives MiB): RSS before the model, the
# peak while loading it, RSS after, the peak through deepspeed.initialize, RSS after, the peak
# through the last training step.
MEMORY_KEYS = ("baseline_rss", "load_peak", "after_load_rss", "initialize_peak", "after_initialize_rss",
               "train_peak")


@dataclass(frozen=True)
class StepPlan:
    num_workers: int
    micro_batch_size: int
    grad_accum: int
    total_steps: int
    warmup_steps: int
    sequences: int = 0  # distinct training sequences
    epochs: int = 1

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.num_workers * self.grad_accum

    @property
    def micro_batches_per_rank(self) -> int:
        return self.total_steps * self.grad_accum

    @property
    def rows_per_rank(self) -> int:
        return self.micro_batches_per_rank * self.micro_batch_size

    @property
    def rows_total(self) -> int:
        return self.rows_per_rank * self.num_workers


def plan_steps(n_sequences: int, cfg: Any) -> StepPlan:
    """The same plan for every rank: accumulation reaches the global batch whatever the workers, and
    the run covers `epochs` passes over the sequences in whole global batches (the last one topped up
    with sequences from the start)."""
    if n_sequences < 1:
        raise ValueError("no training sequences")
    grad_accum = max(1, cfg.global_batch_size // (cfg.micro_batch_size * cfg.num_workers))
    global_batch = cfg.micro_batch_size * cfg.num_workers * grad_accum
    total_steps = math.ceil(cfg.epochs * n_sequences / global_batch)
    return StepPlan(
        num_workers=cfg.num_workers,
        micro_batch_size=cfg.micro_batch_size,
        grad_accum=grad_accum,
        total_steps=total_steps,
        warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),  # as transformers' Trainer rounds
        sequences=n_sequences,
        epochs=cfg.epochs,
    )


def validate(cfg: Any) -> None:
    if not 0.0 <= cfg.sim_loss_weight <= 1.0:
        raise ValueError(f"train.sim_loss_weight must be within [0, 1], got {cfg.sim_loss_weight}")
    if str(cfg.offload) not in OFFLOAD:
        raise ValueError(f"train.offload must be one of {', '.join(OFFLOAD)}, got {cfg.offload!r}")
    if str(cfg.attn_implementation) not in ATTENTION:
        raise ValueError(f"train.attn_implementation must be one of {', '.join(ATTENTION)}, "
                         f"got {cfg.attn_implementation!r}")
    if str(cfg.attn_implementation).startswith("flash_attention"):
        import importlib.util

        package = "flash_attn_interface" if cfg.attn_implementation == "flash_attention_3" else "flash_attn"
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"train.attn_implementation={cfg.attn_implementation} needs the {package} package; "
                             "install it on every GPU node, or use sdpa")
        if not cfg.use_gpu:
            raise ValueError(f"train.attn_implementation={cfg.attn_implementation} runs on GPUs only")


def deepspeed_config(cfg: Any, plan: StepPlan) -> dict:
    """The JSON file's ZeRO settings, with the batch shape, precision and offload filled in from
    TrainConfig (plain DeepSpeed does not resolve the "auto" values that transformers' integration does)."""
    path = Path(os.path.expanduser(cfg.deepspeed_config))
    if not path.is_absolute():
        path = path if path.is_file() else PROJECT_ROOT / path  # the cwd first, then the project root
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {cfg.deepspeed_config}")
    ds = json.loads(path.read_text())
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ValueError(f"{path}: this recipe exports with ZeRO-3 collectives; set zero_optimization.stage=3")
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds["train_batch_size"] = plan.global_batch
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = 1.0
    ds["bf16"] = {"enabled": bool(cfg.use_gpu)}  # CPU kernels and gloo are fastest and safest in fp32
    ds["fp16"] = {"enabled": False}
    ds["zero_force_ds_cpu_optimizer"] = False  # we pass torch's AdamW: no cpu_adam compile
    offload = str(getattr(cfg, "offload", "none"))
    if offload not in OFFLOAD:
        raise ValueError(f"train.offload must be one of {', '.join(OFFLOAD)}, got {offload!r}")
    pin = bool(cfg.use_gpu)  # pinned host memory speeds up copies to a GPU; pointless on CPU
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return ds


def load_base_model(base_model_dir: str, dtype: Any = None, attn_implementation: Optional[str] = None) -> Any:
    """The base model as plain weights. The embedded default was converted from GGUF and its config
    still names the GGUF quantizer; dropping it makes the exported judge a plain HF folder.

    Inside a live `HfDeepSpeedConfig` with ZeRO-3, transformers builds the model under
    `deepspeed.zero.Init`: every parameter is created partitioned across the ranks and the
    checkpoint's values are copied into the partitions, so no rank holds the whole model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model_dir)
    quant = getattr(config, "quantization_config", None)
    if quant is not None and _quant_method(quant) == "gguf":
        del config.quantization_config
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(base_model_dir, config=config, dtype=dtype or torch.float32, **kwargs)


def _quant_method(quant: Any) -> str:
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", "")
    return str(getattr(method, "value", method))


def enable_checkpointing(model: Any) -> None:
    """Activation checkpointing on every decoder layer, non-reentrant (works with ZeRO-3's parameter
    hooks and needs no input gradients); transformers 5.x renamed the switch."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_model(config: dict) -> tuple[Any, Any]:
    """(model, keep-alive) for a worker: partitioned under ZeRO-3 init, or whole then partitioned by
    deepspeed.initialize (`partitioned_load: false`)."""
    import torch

    dtype = torch.bfloat16 if config["use_gpu"] else torch.float32
    keep = None
    if config["partitioned_load"]:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(config["ds_config"])  # must stay alive while the model is built
    model = load_base_model(config["base_model_dir"], dtype, config["attn_implementation"])
    model.config.use_cache = False  # no KV cache while training
    if config["activation_checkpointing"]:
        enable_checkpointing(model)
    model.train()  # from_pretrained returns eval mode, where transformers skips the checkpointing
    return model, keep


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
    memory = {"baseline_rss": _rss()}  # the process with its libraries, before the model
    model, keep_alive = build_model(config)
    memory.update(load_peak=_peak_rss(), after_load_rss=_rss())
    # No weight decay on norms (1-D weights): decaying them toward zero only hurts.
    params = [p for p in model.parameters() if p.requires_grad]
    # A partitioned parameter is a flat shard: its real shape is `ds_shape`.
    ndim = [len(getattr(p, "ds_shape", p.shape)) for p in params]
    groups = [
        {"params": [p for p, n in zip(params, ndim) if n >= 2], "weight_decay": config["weight_decay"]},
        {"params": [p for p, n in zip(params, ndim) if n < 2], "weight_decay": 0.0},
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
    memory.update(initialize_peak=_peak_rss(), after_initialize_rss=_rss())

    # Resume: weights, optimizer, schedule and step count from the latest reported checkpoint.
    done = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            _, client_state = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        done = int(client_state["step"])

    shard = ray.train.get_dataset_shard("train")
    batches = iter(shard.iter_batches(batch_size=plan.micro_batch_size, batch_format="pyarrow",
                                      local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                      local_shuffle_seed=config["seed"] + rank))
    for _ in range(done * plan.grad_accum):
        _next_batch(batches, rank)  # as many as the checkpointed steps consumed (not the same ones)
    log = MetricsLog(config["metrics_uri"], done) if rank == 0 else None
    objective = build_objective(config)
    fault = _fault(config.get("fault"), rank)
    hang = _hang(config.get("hang"), rank)
    loss = None
    totals = torch.zeros(4, dtype=torch.float64)  # real tokens, tensor tokens, seconds, steps

    for step in range(done + 1, plan.total_steps + 1):
        start = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        objective.begin_step(engine)
        # Summed over micro-batches, then over ranks; the last two are real and tensor tokens.
        stats = torch.zeros(objective.size, dtype=torch.float64)
        for _ in range(plan.grad_accum):
            rows = _next_batch(batches, rank).to_pylist()
            micro_loss, sums = objective.micro_batch(engine, rows, tokenizer.pad_token_id)
            engine.backward(micro_loss)  # DeepSpeed scales by 1/grad_accum itself
            engine.step()  # applies the update only at the accumulation boundary
            stats += sums
            del micro_loss
        # One small all-reduce gives rank 0 the group's sums and token counts.
        stats = stats.to(engine.device)
        dist.all_reduce(stats)
        stats = stats.cpu()
        elapsed = time.perf_counter() - start
        figures = objective.metrics(stats)
        loss = figures["loss"]
        real_tokens, tensor_tokens = stats[-2].item(), stats[-1].item()
        totals += torch.tensor([real_tokens, tensor_tokens, elapsed, 1], dtype=torch.float64)
        row = {
            "step": step,
            **figures,
            "lr": lr,
            "tokens_per_s": real_tokens / elapsed,
            "packing_efficiency": real_tokens / tensor_tokens,
        }
        if log:
            log.write(row)
        if fault and step == fault[0]:
            # Ray Train records a reported checkpoint when its controller next polls the workers;
            # a crash before that poll loses the report. The test's crash comes after it.
            _wait_recorded(config["run_uri"])
            fault[1].write_text(f"rank {rank} exited after step {step}\n")
            os._exit(1)  # a hard crash, as a killed or preempted worker
        if config["checkpoint_every"] and step % config["checkpoint_every"] == 0 and step < plan.total_steps:
            # Each rank writes its own shard; Ray merges the ranks' folders into one checkpoint.
            # report() is a barrier costing ~1.7 s on CPU, hence every N steps and not every step.
            with tempfile.TemporaryDirectory(prefix="themis-ckpt-") as folder:
                engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state={"step": step})
                checkpoint = ray.train.Checkpoint.from_directory(folder)
                ray.train.report({"step": step, "loss": loss}, checkpoint=checkpoint)
        if hang and step == hang[0]:
            hang[1].write_text(f"rank {rank} stopped after step {step}\n")
            while True:  # the driver is killed from outside
                time.sleep(1)
    if log:
        log.close()
    memory["train_peak"] = _peak_rss()  # before the export, which gathers the whole model on rank 0
    # Every rank's figures, for the summary (one small all-gather).
    mine = torch.tensor([memory[k] for k in MEMORY_KEYS], dtype=torch.float64).to(engine.device)
    ranks = [torch.zeros_like(mine) for _ in range(ctx.get_world_size())]
    dist.all_gather(ranks, mine)
    memory_per_rank = [{k: round(v / 2**20, 1) for k, v in zip(MEMORY_KEYS, r.cpu().tolist())} for r in ranks]

    # Gathering the ZeRO-3 shards is a collective: every rank calls it, only rank 0 gets weights.
    state_dict = engine._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        _export(engine.module, state_dict, tokenizer, config["output_uri"])
    del state_dict, keep_alive
    real, tensor, seconds, steps_here = totals.tolist()
    summary = {
        "steps": plan.total_steps,
        "optimizer_steps": int(engine.global_steps),  # restored from the checkpoint on a restart
        "resumed_from_step": done,
        "final_loss": loss,
        # this attempt's throughput: every rank's real tokens per second of step time
        "tokens_per_s": real / seconds if seconds else 0.0,
        "packing_efficiency": real / tensor if tensor else 0.0,
        "memory_mib_per_rank": memory_per_rank,  # RSS and peak RSS (ru_maxrss) by phase
    }
    ray.train.report(summary)  # also a barrier: no rank leaves before the export is written
    return summary if rank == 0 else None


def _next_batch(batches, rank: int):
    try:
        return next(batches)
    except StopIteration:
        raise RuntimeError(f"rank {rank}: the data shard ran out before the plan's micro-batches; every "
                           "rank must get plan.rows_per_rank sequences") from None


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsLog:
    """Rank 0's per-step metrics in the stage folder, truncated on a restart to the steps its
    checkpoint kept. Appended locally; on object storage the (small) file is rewritten each step."""

    def __init__(self, uri: str, done: int):
        self.uri, self.local = uri, not fs.is_uri(uri)
        text = fs.read_text(uri) if done else None
        self.lines = [line for line in (text or "").splitlines() if (_step(line) or done + 1) <= done]
        if self.local:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(uri, "w")
            self.file.writelines(line + "\n" for line in self.lines)
            self.file.flush()
        else:
            fs.write_text(uri, "".join(line + "\n" for line in self.lines))

    def write(self, row: dict) -> None:
        line = json.dumps(row)
        self.lines.append(line)
        if self.local:
            self.file.write(line + "\n")
            self.file.flush()
        else:
            fs.write_text(self.uri, "".join(line + "\n" for line in self.lines))

    def close(self) -> None:
        if self.local:
            self.file.close()


def _step(line: str) -> Optional[int]:
    """The step of a metrics line; None for a line a crash cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _fault(spec: str | None, rank: int) -> tuple[int, Path] | None:
    if not spec:
        return None
    fault_rank, step, marker = spec.split(":", 2)
    if int(fault_rank) != rank or Path(marker).exists():
        return None
    return int(step), Path(marker)


def recorded_checkpoints(run_uri: str) -> int:
    """How many checkpoints Ray Train's run snapshot in `run_uri` records (0 when there is none)."""
    try:
        snapshot = fs.read_json(fs.join(run_uri, "checkpoint_manager_snapshot.json"))
    except ValueError:  # being written
        return 0
    return len((snapshot or {}).get("checkpoint_results", []))


def _wait_recorded(run_uri: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not recorded_checkpoints(run_uri) and time.monotonic() < deadline:
        time.sleep(0.5)


def _hang(spec: str | None, rank: int) -> tuple[int, Path] | None:
    if not spec or rank != 0:
        return None
    step, marker = spec.split(":", 1)
    return None if Path(marker).exists() else (int(step), Path(marker))


def plot_losses(metrics_text: str, out: str, series: tuple = SFTObjective.series,
                title: str = SFTObjective.title) -> Optional[str]:
    """Loss per step (the metrics named in `series`, as (key, legend) pairs) as a PNG at `out` (a path or URI)."""
    rows = [json.loads(line) for line in metrics_text.splitlines() if line.strip()]
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in rows]
    for key, label in series:
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax.plot(steps, [float("nan") if v is None else v for v in values], marker=".", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    if fs.is_uri(out):
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(out))
            fig.savefig(local)
            filesystem, path = fs.resolve(out)
            with open(local, "rb") as src, filesystem.open_output_stream(path) as dst:
                dst.write(src.read())
    else:
        fig.savefig(out)
    return out


def _export(model: Any, state_dict: dict, tokenizer: Any, output_uri: str) -> None:
    """Save a plain HF folder (weights, config, tokenizer with its chat template): locally by an
    atomic rename, to object storage by an upload of a finished local folder."""
    model.config.use_cache = True  # the judge generates: give it its KV cache back
    if fs.is_uri(output_uri):
        with tempfile.TemporaryDirectory(prefix="themis-judge-") as tmp:
            _save(model, state_dict, tokenizer, Path(tmp) / "judge")
            fs.upload_dir(str(Path(tmp) / "judge"), output_uri)
        return
    output_dir = Path(output_uri)
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _save(model, state_dict, tokenizer, tmp)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp.rename(output_dir)


def _save(model: Any, state_dict: dict, tokenizer: Any, folder: Path) -> None:
    # SmolLM2 ties lm_head to embed_tokens: the gathered dict holds the shared weight once (as
    # model.embed_tokens.weight) and tie_word_embeddings in the saved config re-ties it on load.
    model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


def check_memory(base_model_dir: str, cfg: Any, sequences_per_row: int = 1) -> dict:
    """Print the per-rank memory estimate; raise MemoryError, before any worker starts, when the
    cluster cannot hold the ranks. Returns the estimate (for the summary)."""
    from themis_ray.train.memory import check_fits, cluster_nodes, estimate_memory, model_shape

    nodes = cluster_nodes(bool(cfg.use_gpu))
    per_node = max((n.slots for n in nodes), default=cfg.num_workers)
    est = estimate_memory(model_shape(base_model_dir), cfg, int(cfg.num_workers), ranks_per_node=per_node,
                          sequences_per_row=sequences_per_row)
    print(est.table(), flush=True)
    if cfg.memory_check:
        check_fits(est, nodes, cfg.gpu_memory_gb)
    return est.as_dict()


def check_model_dir(base_model_dir: str) -> None:
    if not Path(base_model_dir).expanduser().is_dir():
        raise FileNotFoundError(
            f"train.model: base model folder not found: {base_model_dir} (a local Hugging Face folder, "
            "on storage every node can read)"
        )


def fit(prepared: Any, base_model_dir: str, cfg: Any, *, output_uri: str, work_uri: str, metrics_uri: str,
        loss_plot_uri: Optional[str] = None, memory: Optional[dict] = None, objective: Optional[dict] = None) -> dict:
    """Train on the prepared sequences (`data.Prepared`) and export the judge to `output_uri`.

    `objective` picks what the loop trains on (`objectives.py`): None is the judge's SFT loss with
    `cfg.sim_loss_weight`; `{"objective": "dpo", "beta": b, "sft_weight": w}` is DPO on prepared pairs.

    The Ray Train run lives in `<work_uri>/ray_train/train`: when it holds a snapshot (an interrupted
    run of the same stage), Ray Train restores it and the workers continue from its latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from themis_ray.train.data import training_dataset
    from themis_ray.train.objectives import OBJECTIVES

    started = time.time()
    extensions_dir = os.path.expanduser(cfg.torch_extensions_dir)
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions_dir  # for anything DeepSpeed builds in the driver
    plan = plan_steps(prepared.sequences, cfg)
    objective = dict(objective or {"objective": "sft", "sim_loss_weight": float(cfg.sim_loss_weight)})
    kind = OBJECTIVES[objective["objective"]]
    dataset = training_dataset(prepared, int(cfg.epochs), plan.rows_total, int(cfg.seed), columns=kind.columns)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "plan": asdict(plan),
            "ds_config": deepspeed_config(cfg, plan),
            "base_model_dir": str(base_model_dir),
            "output_uri": output_uri,
            "metrics_uri": metrics_uri,
            "torch_extensions_dir": extensions_dir,
            "use_gpu": bool(cfg.use_gpu),
            "partitioned_load": bool(cfg.partitioned_load),
            "activation_checkpointing": bool(cfg.activation_checkpointing),
            "attn_implementation": str(cfg.attn_implementation),
            "learning_rate": float(cfg.learning_rate),
            "weight_decay": float(cfg.weight_decay),
            **objective,
            "checkpoint_every": int(cfg.checkpoint_every),
            "seed": int(cfg.seed),
            "fault": os.environ.get(FAULT_ENV),
            "hang": os.environ.get(HANG_ENV),
            "run_uri": fs.join(work_uri, "ray_train", RUN_NAME),
        },
        datasets={"train": dataset},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": 1}
        ),
        # A stable name under the work folder: a re-run of an interrupted stage restores this run.
        run_config=RunConfig(
            storage_path=fs.join(work_uri, "ray_train"),
            name=RUN_NAME,
            checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.checkpoints_to_keep)),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()  # raises ray.train.TrainingFailedError once restarts are used up
    metrics_text = fs.read_text(metrics_uri) or ""
    steps = [json.loads(line) for line in metrics_text.splitlines() if line.strip()]
    plot = plot_losses(metrics_text, loss_plot_uri, kind.series, kind.title) if loss_plot_uri else None
    return {
        **result.return_value,
        "first_loss": steps[0]["loss"] if steps else None,
        "records": prepared.records,
        "sequences": prepared.sequences,
        "rejected": prepared.rejected,
        "tokens": prepared.tokens,
        "epochs": plan.epochs,
        "global_batch": plan.global_batch,
        "grad_accum": plan.grad_accum,
        "repeated_sequences": plan.rows_total - plan.epochs * plan.sequences,
        "memory_estimate": memory,
        "judge_dir": output_uri,
        "metrics": metrics_uri,
        "loss_plot": plot,
        "wall_s": round(time.time() - started, 2),
    }


def train_judge(records: Any, base_model_dir: str, output_dir: Any, cfg: Any, *,
                work_dir: Optional[str] = None, resume: bool = False) -> dict:
    """Fine-tune `base_model_dir` on (prompt -> evaluation) records; save the judge to `output_dir`.

    `records`: a ray.data.Dataset with string columns id, prompt, evaluation (a list of dicts is
    turned into one, for tests and scripts). The sequences, the checkpoints and the Ray Train run go
    to `work_dir` (default: `_work` beside the judge); without `resume`, a run left there is
    discarded. Metrics per step go to `train_metrics.jsonl` beside the judge, the loss plot to
    `train_loss.png`. Returns fit's summary: steps, optimizer_steps, resumed_from_step, records,
    sequences, rejected (a count; the records are in `<work>/sequences/_rejects/`), first_loss,
    final_loss, tokens_per_s, packing_efficiency, judge_dir, metrics, loss_plot, wall_s.
    """
    import ray

    from themis_ray.train.data import prepare_sequences

    validate(cfg)
    check_model_dir(base_model_dir)
    output_uri = fs.join(str(output_dir))
    parent = output_uri.rsplit("/", 1)[0]
    work_uri = work_dir or fs.join(parent, "_work")
    if not resume:
        fs.delete(work_uri)
    memory = check_memory(base_model_dir, cfg)
    if not isinstance(records, ray.data.Dataset):  # one block: a few tasks, not one per record
        import pyarrow as pa

        records = ray.data.from_arrow(pa.Table.from_pylist(
            [{"id": str(r["id"]), "prompt": r["prompt"], "evaluation": r["evaluation"]} for r in records]))
    prepared = prepare_sequences(records, str(base_model_dir), cfg, work_uri)
    if not prepared.sequences:
        raise ValueError(f"no trainable records: all {prepared.rejected} were rejected")
    return fit(prepared, str(base_model_dir), cfg, output_uri=output_uri, work_uri=work_uri,
               metrics_uri=fs.join(parent, METRICS_FILE), loss_plot_uri=fs.join(parent, LOSS_PLOT), memory=memory)
