"""What one micro-batch trains on, for each training step over the one ZeRO-3 loop (`recipe.py`).

The loop owns DeepSpeed, the data shard, checkpoints, resume and export; an objective turns a
micro-batch of rows into a loss and a vector of sums (summed over micro-batches and ranks, so averages
are exact), and that vector into the step's metrics:

- `SFTObjective` (the train stage): the judge's multi-objective loss on (prompt, evaluation) sequences.
- `PreferenceObjective` (the prefer stage): DPO's sigmoid loss on (prompt, chosen, rejected) pairs,
  with the frozen SFT model's log-probabilities read from the data (computed before training, so no
  reference model is held here), plus `sft_weight` x cross-entropy on the chosen answer.

Both keep the real and tensor token counts as their last two sums: the loop's throughput figures.
"""

from __future__ import annotations

from typing import Any

from themis_ray.train.collate import SFT, collate_rows
from themis_ray.train.losses import answer_logprobs, judge_loss, preference_loss

SFT_COLUMNS = ["input_ids", "labels", "kinds", "segments"]
PAIR_COLUMNS = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels",
                "ref_chosen", "ref_rejected"]


def _ratio(total: float, count: float) -> float | None:
    return float(total) / float(count) if float(count) else None


class SFTObjective:
    name = "sft"
    columns = SFT_COLUMNS
    size = 10  # loss, micro-batches, ce sum/n, sft sum/n, sim sum/n, real tokens, tensor tokens
    # (metric, legend) drawn in the loss plot
    series = (("loss", "loss"), ("sft_loss", "SFT tokens: cross-entropy"), ("sim_loss", "Sim tokens: 1 - cos"))
    title = "judge fine-tuning"

    def __init__(self, config: dict):
        self.sim_weight = float(config.get("sim_loss_weight", 0.0))
        self.table = None

    def begin_step(self, engine: Any) -> None:
        # The Sim loss compares against the embedding matrix, which ZeRO-3 keeps partitioned: gather
        # it once per optimizer step (a collective on every rank) as a fixed target space.
        self.table = _gathered_embeddings(engine) if self.sim_weight > 0 else None

    def micro_batch(self, engine: Any, rows: list[dict], pad_id: int):
        import torch

        batch = collate_rows(rows, pad_id)
        real, labels, kinds = batch.pop("real_tokens"), batch.pop("labels"), batch.pop("kinds")
        inputs = {k: v.to(engine.device) for k, v in batch.items()}
        # No KV cache: with one, transformers would not read restarting position ids as packing.
        out = engine(**inputs, use_cache=False)
        loss, parts = judge_loss(out.logits, labels.to(engine.device), kinds.to(engine.device), self.table,
                                 self.sim_weight)
        sums = torch.tensor([loss.item(), 1, parts["ce_sum"], parts["ce_n"], parts["sft_sum"], parts["sft_n"],
                             parts["sim_sum"], parts["sim_n"], real, labels.numel()], dtype=torch.float64)
        return loss, sums

    def metrics(self, s: Any) -> dict:
        return {
            "loss": s[0].item() / s[1].item(),
            "ce_loss": _ratio(s[2], s[3]),
            "sft_loss": _ratio(s[4], s[5]),
            "sim_loss": _ratio(s[6], s[7]) if self.sim_weight > 0 else None,
            "sft_tokens": int(s[5]),
            "sim_tokens": int(s[7]),
        }


class PreferenceObjective:
    name = "dpo"
    columns = PAIR_COLUMNS
    # loss, micro-batches, dpo sum, chosen ratio sum, rejected ratio sum, margin sum, correct, pairs,
    # chosen cross-entropy sum/n, real tokens, tensor tokens
    size = 12
    series = (("loss", "loss"), ("dpo_loss", "DPO: -log sigmoid(margin)"), ("reward_margin", "reward margin"),
              ("sft_loss", "SFT term: chosen cross-entropy"))
    title = "preference optimisation (DPO)"

    def __init__(self, config: dict):
        self.beta = float(config["beta"])
        self.sft_weight = float(config.get("sft_weight", 0.0))

    def begin_step(self, engine: Any) -> None:
        pass

    def micro_batch(self, engine: Any, rows: list[dict], pad_id: int):
        """Chosen and rejected sequences of the micro-batch's pairs in one padded forward pass."""
        import torch

        sequences = [_sequence(r[f"{side}_input_ids"], r[f"{side}_labels"]) for side in ("chosen", "rejected")
                     for r in rows]
        batch = collate_rows(sequences, pad_id)
        real, labels, kinds = batch.pop("real_tokens"), batch.pop("labels"), batch.pop("kinds")
        inputs = {k: v.to(engine.device) for k, v in batch.items()}
        out = engine(**inputs, use_cache=False)
        labels = labels.to(engine.device)
        logps = answer_logprobs(out.logits, labels)
        n = len(rows)
        ref = torch.tensor([[r["ref_chosen"] for r in rows], [r["ref_rejected"] for r in rows]],
                           dtype=torch.float32, device=logps.device)
        loss, parts = preference_loss(logps[:n], logps[n:], ref[0], ref[1], self.beta)
        ce_sum, ce_n = 0.0, 0
        if self.sft_weight > 0:
            sft, sft_parts = judge_loss(out.logits[:n], labels[:n], kinds[:n].to(engine.device))
            loss = loss + self.sft_weight * sft
            ce_sum, ce_n = sft_parts["ce_sum"], sft_parts["ce_n"]
        sums = torch.tensor([loss.item(), 1, parts["dpo_sum"], parts["chosen_sum"], parts["rejected_sum"],
                             parts["margin_sum"], parts["correct"], parts["pairs"], ce_sum, ce_n, real,
                             labels.numel()], dtype=torch.float64)
        return loss, sums

    def metrics(self, s: Any) -> dict:
        pairs = s[7].item()
        return {
            "loss": s[0].item() / s[1].item(),
            "dpo_loss": _ratio(s[2], pairs),
            "chosen_logratio": _ratio(s[3], pairs),
            "rejected_logratio": _ratio(s[4], pairs),
            "reward_margin": _ratio(s[5], pairs),
            "reward_accuracy": _ratio(s[6], pairs),
            "sft_loss": _ratio(s[8], s[9]) if self.sft_weight > 0 else None,
            "pairs": int(pairs),
        }


def _sequence(input_ids: list[int], labels: list[int]) -> dict:
    return {"input_ids": input_ids, "labels": labels, "kinds": [SFT] * len(input_ids), "segments": [len(input_ids)]}


def _gathered_embeddings(engine: Any) -> Any:
    import deepspeed

    weight = engine.module.get_input_embeddings().weight
    with deepspeed.zero.GatheredParameters([weight]):
        return weight.detach().clone()


OBJECTIVES = {o.name: o for o in (SFTObjective, PreferenceObjective)}


def build_objective(config: dict):
    """The objective a worker trains with, from the loop's config (`objective`: sft | dpo)."""
    kind = config.get("objective", "sft")
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown training objective {kind!r}; objectives: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind](config)
