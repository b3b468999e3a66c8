"""Records -> token ids with a loss mask and token kinds -> padded or packed micro-batches.

A record is a two-turn chat: the user turn is the rendered evaluation prompt, the assistant turn is
the teacher's evaluation. Only the assistant's answer (and its end-of-turn token) carries loss.
Each answer token is also labelled SFT (scores, `[[n]]` markers, criterion names, end of turn) or
Sim (explanation prose), the split the paper's multi-objective loss trains differently.

A training sequence is a list of examples: one in padded mode, several in packed mode, where the
records sit end to end with position ids restarting at 0 for each one. The Ray Data plan stores a
sequence as one flat row (`sequence_row`: token lists end to end and each record's length). transformers (5.x) reads
restarting position ids with no attention mask as packed sequences and builds a block-diagonal
causal mask, so no record attends to another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from themis_ray.engines import plain_conversation

IGNORE_INDEX = -100  # the label torch's cross-entropy skips
SFT, SIM = 0, 1  # token kinds: cross-entropy only, or cross-entropy blended with embedding similarity
# Format text trained as SFT: score and verdict markers, and short "Name:" labels opening a line
# (criterion names, "Strengths:"); everything else in the answer is explanation (Sim).
_FORMAT = re.compile(r"\[\[[^\[\]\n]{0,12}\]\]|^[ \t]*(?:[-*•]|\d{1,2}[.)])?[ \t]*[^\n:]{1,40}:", re.M)


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt, the token id on the answer
    kinds: list[int] | None = None  # SFT or SIM per token (meaningful where labels are kept)

    def __post_init__(self):
        if self.kinds is None:
            self.kinds = [SFT] * len(self.input_ids)


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
    # Trained on the text the engines serve: a special token inside the prompt or answer is plain text.
    user = plain_conversation(tokenizer, [{"role": "user", "content": record["prompt"]}])
    chat = user + plain_conversation(tokenizer, [{"role": "assistant", "content": record["evaluation"]}])
    prompt_ids = _ids(tokenizer, tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False))
    full_text = tokenizer.apply_chat_template(chat, tokenize=False)
    full_ids = _ids(tokenizer, full_text)
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
    kinds = token_kinds(full_text, record["evaluation"], tokenizer)
    kinds = kinds[len(prompt_ids) : len(prompt_ids) + len(answer)]
    return Example(
        id=str(record["id"]),
        input_ids=prompt_ids + answer,
        labels=[IGNORE_INDEX] * len(prompt_ids) + answer,
        kinds=[SFT] * len(prompt_ids) + kinds,
    )


def format_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the evaluation's format text (SFT); the rest is explanation (Sim)."""
    return [m.span() for m in _FORMAT.finditer(text)]


def token_kinds(full_text: str, evaluation: str, tokenizer: Any) -> list[int]:
    """SFT or SIM for every token of the templated conversation: a token inside the evaluation's
    explanation prose is SIM; format text, and anything outside the evaluation (the prompt, the
    end-of-turn token), is SFT. Character offsets come from a fast tokenizer; a slow one (no
    offsets) gets SFT everywhere, which is plain cross-entropy."""
    try:
        offsets = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError):
        return [SFT] * len(_ids(tokenizer, full_text))
    start = full_text.rfind(evaluation)  # the assistant turn is the last thing in the text
    if not evaluation or start < 0:
        return [SFT] * len(offsets)
    end = start + len(evaluation)
    spans = [(start + a, start + b) for a, b in format_spans(evaluation)]
    kinds = []
    for a, b in offsets:
        prose = start <= a and b <= end and not any(s < b and a < e for s, e in spans)
        kinds.append(SIM if prose and b > a else SFT)
    return kinds


def encode_records(
    records: Iterable[dict], tokenizer: Any, max_length: int
) -> tuple[list[Example], list[dict]]:
    """All records -> (examples, rejects with their token count). Too-long records are rejected, never
    truncated: a truncated evaluation would teach the judge to stop mid-sentence or lose its score."""
    examples, rejects = [], []
    for record in records:
        example = encode(record, tokenizer)
        n = len(example.input_ids)
        if n > max_length:
            rejects.append({"id": example.id, "tokens": n, "reason": f"too long: {n} tokens > max_length {max_length}"})
        else:
            examples.append(example)
    return examples, rejects


def pack(examples: list[Example], max_length: int) -> list[list[Example]]:
    """Examples -> sequences of at most `max_length` tokens, first-fit by decreasing length
    (deterministic: ties keep their input order). Every example fits, being no longer than the limit."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[Example]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_length:
            raise ValueError(f"example {examples[i].id!r}: {n} tokens exceed the packing length {max_length}")
        slot = next((b for b, free in enumerate(room) if free >= n), None)
        if slot is None:
            bins.append([])
            room.append(max_length)
            slot = len(bins) - 1
        bins[slot].append(examples[i])
        room[slot] -= n
    return bins


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pad a micro-batch into tensors; padding is masked out of attention and loss."""
    return collate_sequences([[e] for e in examples], pad_id)


def sequence_row(examples: list[Example]) -> dict:
    """A training sequence as the flat row the Ray Data plan writes: the records' tokens end to end,
    with `segments` holding each record's length (one segment when not packed)."""
    return {
        "ids": [e.id for e in examples],
        "segments": [len(e.input_ids) for e in examples],
        "input_ids": [t for e in examples for t in e.input_ids],
        "labels": [t for e in examples for t in e.labels],
        "kinds": [k for e in examples for k in e.kinds],
        "tokens": sum(len(e.input_ids) for e in examples),
    }


def collate_sequences(sequences: list[list[Example]], pad_id: int) -> dict:
    """Right-pad a micro-batch of sequences (lists of examples) into tensors; see `collate_rows`."""
    return collate_rows([sequence_row(seq) for seq in sequences], pad_id)


def collate_rows(rows: list[dict], pad_id: int) -> dict:
    """Right-pad a micro-batch of sequence rows (`sequence_row`'s shape) into tensors.

    A sequence of one record gets an attention mask (plain padding). A micro-batch holding any
    sequence of several records is packed: no attention mask, and position ids that restart at 0
    for each record and for the padding tail, so every record (and the padding) is its own block of
    the causal mask. Labels of padding are IGNORE_INDEX either way; the first token of each record
    is a prompt token, so no label ever asks one record to predict the next."""
    import torch

    lengths = [len(row["input_ids"]) for row in rows]
    width = max(lengths)
    packed = any(len(row["segments"]) > 1 for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    kinds = torch.full((len(rows), width), SFT, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = lengths[i]
        input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        kinds[i, :n] = torch.as_tensor(row["kinds"], dtype=torch.long)
        pos = 0
        for length in row["segments"]:
            position_ids[i, pos : pos + length] = torch.arange(length)
            pos += length
        position_ids[i, pos:] = torch.arange(width - pos)
    batch = {"input_ids": input_ids, "labels": labels, "kinds": kinds}
    if packed:
        batch["position_ids"] = position_ids
    else:
        batch["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    batch["real_tokens"] = int(sum(lengths))
    return batch
