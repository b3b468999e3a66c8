"""Records -> token ids with a loss mask -> padded micro-batches.

A record is a two-turn chat: the user turn is the rendered evaluation prompt, the assistant turn is
the teacher's evaluation. Only the assistant's answer (and its end-of-turn token) carries loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

IGNORE_INDEX = -100  # the label torch's cross-entropy skips


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt, the token id on the answer


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes the assistant's turn (<|im_end|> for ChatML templates)."""
    token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
        return token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither <|im_end|> nor an eos token to end the answer with")
    return tokenizer.eos_token_id


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The chat template already wrote every special token; adding a BOS again would shift the prefix.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode(record: dict, tokenizer: Any) -> Example:
    """Tokenize one record with the chat template; mask everything but the answer."""
    user = [{"role": "user", "content": record["prompt"]}]
    chat = user + [{"role": "assistant", "content": record["evaluation"]}]
    prompt_ids = _ids(tokenizer, tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False))
    full_ids = _ids(tokenizer, tokenizer.apply_chat_template(chat, tokenize=False))
    if full_ids[: len(prompt_ids)] != prompt_ids:
        # A template or tokenizer that merges tokens across the turn boundary would silently
        # train on the wrong span; refuse rather than guess.
        raise ValueError(
            f"record {record.get('id')!r}: the generation prompt's tokens are not a prefix of the "
            "full conversation's tokens; the chat template or tokenizer merges across the boundary"
        )
    answer = full_ids[len(prompt_ids) :]
    eot = end_of_turn_id(tokenizer)
    if eot not in answer:
        raise ValueError(f"record {record.get('id')!r}: no end-of-turn token (id {eot}) after the answer")
    # Keep the answer through its last end-of-turn token; what the template adds after it (a
    # newline) is never generated, so it is neither trained on nor fed.
    answer = answer[: len(answer) - answer[::-1].index(eot)]
    return Example(
        id=str(record["id"]),
        input_ids=prompt_ids + answer,
        labels=[IGNORE_INDEX] * len(prompt_ids) + answer,
    )


def encode_records(
    records: Iterable[dict], tokenizer: Any, max_length: int
) -> tuple[list[Example], list[dict]]:
    """All records -> (examples, rejects). Too-long records are rejected, never truncated:
    a truncated evaluation would teach the judge to stop mid-sentence or lose its score."""
    examples, rejects = [], []
    for record in records:
        example = encode(record, tokenizer)
        n = len(example.input_ids)
        if n > max_length:
            rejects.append({"id": example.id, "reason": f"too long: {n} tokens > max_length {max_length}"})
        else:
            examples.append(example)
    return examples, rejects


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pad a micro-batch into tensors; padding is masked out of attention and loss."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
