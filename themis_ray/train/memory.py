"""Memory per rank before training starts: model states, activations, and whether the cluster holds them.

The model's shape comes from its config alone (built on the meta device: no weights are read). Model
states under ZeRO-3 are DeepSpeed's own estimate (`estimate_zero3_model_states_mem_needs`: 16-bit
parameters and gradients, fp32 master weights and Adam moments, partitioned over the ranks, with
`train.offload` moving them to host memory) on GPU; on CPU the recipe trains in fp32, where the
same partitioning holds 20 bytes per parameter (fp32 parameters, gradients and master copy, two Adam
moments), which DeepSpeed's estimator does not cover. A full (unpartitioned) load adds the whole
model in fp32 on every rank while it loads.

Activations per micro-batch are counted per decoder layer from the tensors autograd keeps for a
Llama/Qwen2-style block (norms, q/k/v, attention output, the gated MLP's four intermediate
tensors: about 8h + 3kv + 4i values per token), plus the attention matrix where the kernel
materialises it (`eager`), plus the logits in the loss (16-bit logits, their fp32 copy and its
gradient). With activation checkpointing only each layer's input is kept, and one layer is
recomputed at a time. The figures are estimates for planning, not measurements: allocator
fragmentation and framework buffers come on top (DeepSpeed's own factor of 1.5 is kept for host
memory).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    params: int
    largest_layer_params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int


def model_shape(model_dir: str) -> ModelShape:
    """Parameter counts and dimensions from the model folder's config, without reading weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen, largest = {}, 0
    for module in model.modules():
        own = {id(p): p.numel() for p in module.parameters(recurse=False)}
        largest = max(largest, sum(own.values()))
        seen.update(own)
    text = getattr(config, "text_config", None) or config
    heads = int(getattr(text, "num_attention_heads", 1))
    return ModelShape(
        params=sum(seen.values()),  # tied weights once
        largest_layer_params=largest,
        layers=int(getattr(text, "num_hidden_layers", 1)),
        hidden=int(getattr(text, "hidden_size", 1)),
        intermediate=int(getattr(text, "intermediate_size", 4 * getattr(text, "hidden_size", 1))),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        vocab=int(getattr(text, "vocab_size", 1)),
    )


@dataclass(frozen=True)
class MemoryEstimate:
    world: int
    ranks_per_node: int
    device: str  # "gpu" or "cpu": where the rank trains
    model_states_per_rank: float  # bytes on the training device
    host_per_node: float  # bytes of host memory per node for model states (and loading)
    load_per_rank: float  # extra bytes per rank while the base model loads
    activations_per_rank: float  # one micro-batch, forward and backward
    total_per_rank: float  # on the training device (host memory when training on CPU)
    shape: ModelShape
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "shape"}
        out["shape"] = asdict(self.shape)
        for key in ("model_states_per_rank", "host_per_node", "load_per_rank", "activations_per_rank",
                    "total_per_rank"):
            out[key + "_gb"] = round(out.pop(key) / GB, 3)
        return out

    def table(self) -> str:
        s = self.shape
        where = "GPU" if self.device == "gpu" else "host (CPU training)"
        lines = [
            f"train memory estimate: {s.params / 1e9:.3f}B parameters (largest layer {s.largest_layer_params / 1e6:.1f}M),"
            f" {self.world} ranks, {self.ranks_per_node} per node",
            f"  per rank, {where}: model states {self.model_states_per_rank / GB:.2f} GB"
            f" + activations {self.activations_per_rank / GB:.2f} GB = {self.total_per_rank / GB:.2f} GB",
            f"  while loading the base model: +{self.load_per_rank / GB:.2f} GB per rank",
            f"  host memory per node for model states: {self.host_per_node / GB:.2f} GB",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def activation_bytes(shape: ModelShape, micro_batch: int, seq: int, dtype_bytes: int, checkpointing: bool,
                     attn: str) -> float:
    """Activations autograd holds for one micro-batch of `micro_batch` x `seq` tokens."""
    tokens = micro_batch * seq
    kv = shape.hidden * shape.kv_heads // max(1, shape.heads)
    per_layer = tokens * (8 * shape.hidden + 3 * kv + 4 * shape.intermediate) * dtype_bytes
    if attn == "eager":  # the attention probabilities, per head
        per_layer += micro_batch * shape.heads * seq * seq * dtype_bytes
    layers = (shape.layers * tokens * shape.hidden * dtype_bytes + per_layer) if checkpointing \
        else shape.layers * per_layer
    logits = tokens * shape.vocab * (dtype_bytes + 4 + 4)  # logits, their fp32 copy, its gradient
    return float(layers + logits)


def estimate_memory(shape: ModelShape, cfg: Any, world: int, ranks_per_node: Optional[int] = None,
                    sequences_per_row: int = 1) -> MemoryEstimate:
    """`sequences_per_row`: sequences each micro-batch row runs through the model (2 for a DPO pair:
    chosen and rejected in one forward pass)."""
    ranks_per_node = max(1, min(world, ranks_per_node or world))
    nodes = math.ceil(world / ranks_per_node)
    offload = str(cfg.offload)
    partitioned = bool(cfg.partitioned_load)
    notes = []
    if cfg.use_gpu:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        host, device_states, _ = estimate_zero3_model_states_mem_needs(
            shape.params, shape.largest_layer_params, num_gpus_per_node=ranks_per_node, num_nodes=nodes,
            cpu_offload=offload in ("optimizer", "all"), cpu_offload_params=offload == "all",
            zero_init=partitioned)
        dtype_bytes = 2  # bf16
        notes.append("model states: DeepSpeed's estimate_zero3_model_states_mem_needs")
    else:
        dtype_bytes = 4  # fp32 on CPU
        # fp32 parameters, gradients, master copy and two Adam moments, partitioned; the gathered
        # working set (prefetch and the largest layer) beside them.
        device_states = 20 * shape.params / world + 2 * 4 * shape.largest_layer_params
        host = device_states * ranks_per_node
        notes.append("CPU training in fp32: 20 bytes per parameter, partitioned (DeepSpeed's estimator covers GPU)")
    load = 0.0 if partitioned else 4.0 * shape.params  # the whole model in fp32 on every rank
    if not partitioned:
        host = max(host, ranks_per_node * 4.0 * shape.params)
    if sequences_per_row > 1:
        notes.append(f"activations for {sequences_per_row} sequences per micro-batch row (a preference pair)")
    rows = int(cfg.micro_batch_size) * sequences_per_row
    activations = activation_bytes(shape, rows, int(cfg.max_length), dtype_bytes, bool(cfg.activation_checkpointing),
                                   str(cfg.attn_implementation))
    return MemoryEstimate(world=world, ranks_per_node=ranks_per_node, device="gpu" if cfg.use_gpu else "cpu",
                          model_states_per_rank=float(device_states), host_per_node=float(host),
                          load_per_rank=load, activations_per_rank=activations,
                          total_per_rank=float(device_states) + activations, shape=shape, notes=tuple(notes))


@dataclass(frozen=True)
class Node:
    slots: int  # train workers it can hold (GPUs, or CPUs when training on CPU)
    memory: float  # bytes of host memory Ray may hand to tasks on it


def cluster_nodes(use_gpu: bool, cpus_per_worker: float = 1.0) -> list[Node]:
    """The alive Ray nodes as worker slots and host memory."""
    import ray

    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        slots = int(res.get("GPU", 0)) if use_gpu else int(res.get("CPU", 0) // cpus_per_worker)
        if slots:
            nodes.append(Node(slots=slots, memory=float(res.get("memory", 0.0))))
    return nodes


def check_fits(est: MemoryEstimate, nodes: list[Node], gpu_memory_gb: Optional[float] = None) -> list[str]:
    """Raise MemoryError naming the figures when the ranks cannot fit; return the checks done."""
    done, hints = [], ("train.offload=optimizer (or all), train.activation_checkpointing=true, a smaller "
                       "train.micro_batch_size or train.max_length, or more train.num_workers")
    if est.device == "gpu" and gpu_memory_gb:
        done.append("gpu")
        if est.total_per_rank > gpu_memory_gb * GB:
            raise MemoryError(
                f"train: each rank needs about {est.total_per_rank / GB:.1f} GB of GPU memory "
                f"(model states {est.model_states_per_rank / GB:.1f} GB + activations "
                f"{est.activations_per_rank / GB:.1f} GB) but train.gpu_memory_gb is {gpu_memory_gb:g}; try {hints}")
    if sum(n.slots for n in nodes) < est.world:
        return done  # an autoscaling cluster may add nodes: nothing to check against yet
    done.append("host")
    if est.device == "cpu":
        per_rank = est.total_per_rank + est.load_per_rank
        fits = sum(min(n.slots, int(n.memory // per_rank)) for n in nodes)
        need = f"{per_rank / GB:.1f} GB of host memory per rank (training on CPU)"
    else:
        per_rank = est.host_per_node / est.ranks_per_node
        fits = sum(min(n.slots, int(n.memory // per_rank)) if per_rank else n.slots for n in nodes)
        need = f"{est.host_per_node / GB:.1f} GB of host memory per node of {est.ranks_per_node} ranks"
    if fits < est.world:
        largest = max(n.memory for n in nodes) / GB
        raise MemoryError(f"train: {est.world} ranks need {need}; the cluster's nodes hold {fits} such ranks "
                          f"(largest node: {largest:.1f} GB for tasks); try {hints}")
    return done
