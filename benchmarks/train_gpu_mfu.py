"""Tokens/s and model FLOPs utilisation of the judge's training step on one GPU: the train worker's inner
loop without Ray or DeepSpeed, needing only torch and transformers.

The step is the recipe's (themis_ray/train/recipe.py `_train_worker`): packed sequences (records end to
end, position ids restarting at 0 for each, no attention mask, so transformers builds a block-diagonal
causal mask), bf16, activation checkpointing (non-reentrant) on every decoder layer, the loss on the
answer tokens only, computed in fp32 from the logits as `losses.judge_loss` does with
sim_loss_weight 0, gradient clipping at 1.0 and AdamW. Differences from the recipe: no ZeRO-3 (one
GPU: nothing to partition or gather), and the AdamW state lives on the bf16 parameters (fused AdamW)
where DeepSpeed keeps fp32 master weights; neither changes the model FLOPs of a step.

The model is a random-initialised Qwen2 from a config (`--size 0.5b` or `1.5b`: Qwen2-0.5B and
Qwen2-1.5B's shapes, tied embeddings, 151,936-token vocabulary). Sequences are `--seq` (2,048) tokens
packed from documents whose lengths are drawn from 200..1,200 tokens (the judge records' range), the
last 15% of each document being the answer that carries loss.

Model FLOPs per token (counted, not measured): 6 x the parameters of every matrix multiply (the
decoder's linear layers and the LM head; the input embedding lookup is no matmul) + the attention
matmuls, 12 x layers x hidden x the token's own document length (PaLM's convention, forward and
backward, for the block-diagonal attention a packed sequence really needs). Activation
checkpointing's recomputed forward is not counted (it is hardware FLOPs, not model FLOPs). MFU =
model FLOPs per second / the GPU's dense bf16 peak (`--peak-tflops`, or from the device name).

    python benchmarks/train_gpu_mfu.py --size 1.5b --micro-batch 8 --steps 20
    python benchmarks/train_gpu_mfu.py --size tiny --steps 3          # CPU check of the script itself
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time

import torch
import torch.nn.functional as F

SIZES = {  # Qwen2 family shapes
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024),
}
PEAK_BF16_TFLOPS = {  # dense, no sparsity
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
}
IGNORE_INDEX = -100


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "GH200" before "H200"
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def packed_batch(rng: random.Random, micro_batch: int, seq: int, vocab: int, device: torch.device):
    """`micro_batch` sequences of `seq` tokens packed from documents of 200..1,200 tokens (shorter for
    tiny sequences); returns the tensors and each row's document lengths."""
    low, high = (200, 1200) if seq >= 2048 else (max(4, seq // 10), max(8, seq // 2))
    input_ids = torch.randint(0, vocab, (micro_batch, seq))
    labels = torch.full((micro_batch, seq), IGNORE_INDEX)
    position_ids = torch.zeros((micro_batch, seq), dtype=torch.long)
    docs = []
    for row in range(micro_batch):
        lengths, pos = [], 0
        while pos < seq:
            n = min(rng.randint(low, high), seq - pos)
            position_ids[row, pos:pos + n] = torch.arange(n)
            answer = max(1, int(0.15 * n))
            labels[row, pos + n - answer:pos + n] = input_ids[row, pos + n - answer:pos + n]
            lengths.append(n)
            pos += n
        docs.append(lengths)
    return {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device)}, labels.to(device), docs


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer tokens, in fp32 (losses.judge_loss with sim_loss_weight 0)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    keep = labels != IGNORE_INDEX
    return F.cross_entropy(logits[keep], labels[keep])


def matmul_params(model) -> int:
    """Parameters that take part in a matrix multiply per token: every nn.Linear (the LM head included,
    tied or not); the embedding lookup and the norms do not."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on every decoder layer, as the recipe switches it on."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1.5b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--attn", default="sdpa", help="sdpa | eager | flash_attention_2 (where installed)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.size == "tiny" and args.seq == 2048:
        args.seq = 256
    dtype = torch.bfloat16
    torch.manual_seed(0)
    config = Qwen2Config(**SIZES[args.size], tie_word_embeddings=True, max_position_embeddings=max(4096, args.seq),
                         use_cache=False, attn_implementation=args.attn)
    with device:
        model = Qwen2ForCausalLM(config).to(dtype)
    if not args.no_checkpointing:
        enable_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    params = sum(p.numel() for p in model.parameters())
    mm_params = matmul_params(model)
    layers, hidden = config.num_hidden_layers, config.hidden_size

    rng = random.Random(0)
    tokens = model_flops = 0.0
    losses = []
    elapsed = 0.0
    for step in range(args.warmup + args.steps):
        inputs, labels, docs = packed_batch(rng, args.micro_batch, args.seq, config.vocab_size, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(**inputs, use_cache=False).logits
        loss = answer_loss(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        losses.append(loss.item())
        if step >= args.warmup:
            n = args.micro_batch * args.seq
            attention = sum(12 * layers * hidden * length * length for row in docs for length in row)
            tokens += n
            model_flops += 6 * mm_params * n + attention
            elapsed += seconds
        del logits, loss
    peak = args.peak_tflops or peak_tflops(device)
    achieved = model_flops / elapsed / 1e12
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "size": args.size, "params": params, "matmul_params": mm_params,
        "seq": args.seq, "micro_batch": args.micro_batch, "tokens_per_step": args.micro_batch * args.seq,
        "activation_checkpointing": not args.no_checkpointing, "attn": args.attn, "dtype": "bfloat16",
        "timed_steps": args.steps, "step_s": round(elapsed / args.steps, 4),
        "tokens_per_s": round(tokens / elapsed, 1), "model_tflops_per_s": round(achieved, 2),
        "peak_tflops": peak, "mfu": round(achieved / peak, 4) if peak else None,
        "flops_per_token": round(model_flops / tokens), "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "command": "python benchmarks/train_gpu_mfu.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("out", "no_checkpointing") and v is not None) + (" --no-checkpointing" if args.no_checkpointing else ""),
    }
    assert all(math.isfinite(x) for x in losses), losses
    print(json.dumps(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
