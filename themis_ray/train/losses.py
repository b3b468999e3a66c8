"""The judge's training losses: the paper's multi-objective split over answer tokens (SFT), and DPO on
preference pairs (`preference_loss`, for the prefer stage).

SFT tokens (scores, markers, criterion names, end of turn) take cross-entropy. Sim tokens
(explanation prose) take `(1 - w) * cross-entropy + w * (1 - cos(e_pred, e_target))`, where
`e_pred = softmax(logits) @ E` is the expected embedding of the predicted token, `e_target` the
target token's embedding and `w` is `train.sim_loss_weight`: an explanation is right when it says
something close to the teacher's, not only the teacher's exact word. w = 0 is plain SFT, token for
token the mean cross-entropy over answer tokens that transformers computes from `labels`.
"""

from __future__ import annotations

from typing import Any

from themis_ray.train.collate import IGNORE_INDEX, SIM


def judge_loss(logits: Any, labels: Any, kinds: Any, embeddings: Any = None, sim_weight: float = 0.0):
    """(loss, parts) for one micro-batch. `logits` [B, T, V], `labels` and `kinds` [B, T], unshifted;
    `embeddings` [V, H], the (gathered, detached) input embedding matrix, needed when sim_weight > 0.

    parts holds sums and counts, so ranks and micro-batches can be averaged exactly:
    ce_sum/ce_n over every answer token, sft_sum/sft_n (cross-entropy on SFT tokens),
    sim_sum/sim_n (1 - cosine on Sim tokens; sim_sum is 0 when the similarity term is off)."""
    import torch
    import torch.nn.functional as F

    logits = logits[:, :-1].float()  # as transformers does: the loss is computed in fp32
    labels, kinds = labels[:, 1:], kinds[:, 1:]
    keep = labels != IGNORE_INDEX
    n = keep.sum()
    if n == 0:
        raise ValueError("a micro-batch with no answer token to train on")
    logits, labels, is_sim = logits[keep], labels[keep], kinds[keep] == SIM  # [N, V], [N], [N]
    ce = F.cross_entropy(logits, labels, reduction="none")
    per_token = ce
    sim = torch.zeros((), device=ce.device)
    if sim_weight > 0 and bool(is_sim.any()):
        if embeddings is None:
            raise ValueError("sim_loss_weight > 0 needs the embedding matrix")
        table = embeddings.to(logits.dtype)
        expected = torch.softmax(logits[is_sim], dim=-1) @ table  # [S, H]
        target = table[labels[is_sim]]
        sim_tokens = 1.0 - F.cosine_similarity(expected, target, dim=-1)
        per_token = ce.clone()
        per_token[is_sim] = (1.0 - sim_weight) * ce[is_sim] + sim_weight * sim_tokens
        sim = sim_tokens.detach().sum()
    loss = per_token.sum() / n
    parts = {
        "ce_sum": ce.detach().sum().item(),
        "ce_n": int(n),
        "sft_sum": ce.detach()[~is_sim].sum().item(),
        "sft_n": int((~is_sim).sum()),
        "sim_sum": sim.item(),
        "sim_n": int(is_sim.sum()),
    }
    return loss, parts


def answer_logprobs(logits: Any, labels: Any) -> Any:
    """Per row, the summed log-probability of its answer tokens without the closing end-of-turn token:
    the tokens an engine's `token_logprobs` scores for the answer text, so a policy's sum and the
    reference's stored sum cover the same tokens. `logits` [B, T, V], `labels` [B, T], unshifted."""
    import torch

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    keep = labels != IGNORE_INDEX
    last = keep & (keep.long().cumsum(1) == keep.sum(1, keepdim=True))  # each row's end-of-turn
    scored = keep & ~last
    if bool((scored.sum(1) == 0).any()):
        raise ValueError("a preference sequence with no answer token to score")
    safe = labels.masked_fill(~scored, 0)
    token = torch.gather(logits, 2, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token * scored).sum(1)


def preference_loss(policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float):
    """DPO's sigmoid loss, -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged over the
    pairs of a micro-batch. Arguments are [B] summed answer log-probabilities (`answer_logprobs`).

    parts holds sums over the pairs (divide by `pairs`): loss, the chosen and rejected log-ratios,
    the reward margin beta * (chosen ratio - rejected ratio), and how many margins are above 0 (the
    implicit reward ranks the teacher's judgment first)."""
    import torch.nn.functional as F

    chosen = policy_chosen.float() - ref_chosen.float()
    rejected = policy_rejected.float() - ref_rejected.float()
    margin = beta * (chosen - rejected)
    losses = -F.logsigmoid(margin)
    parts = {
        "dpo_sum": losses.detach().sum().item(),
        "chosen_sum": chosen.detach().sum().item(),
        "rejected_sum": rejected.detach().sum().item(),
        "margin_sum": margin.detach().sum().item(),
        "correct": int((margin.detach() > 0).sum()),
        "pairs": int(margin.numel()),
    }
    return losses.mean(), parts
