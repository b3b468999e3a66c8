"""Duplicate instructions and the diversity of what is left.

Exact duplicates are equal after case, whitespace and punctuation are normalised. Near-duplicates
share most of their character shingles: MinHash LSH (datasketch) proposes candidates in about
constant time per instruction, and the exact Jaccard similarity of the shingle sets decides, so the
threshold means what it says. The first instruction in the given order is kept; each later twin
names it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional

_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def shingles(text: str, k: int) -> set[str]:
    norm = normalise(text)
    if len(norm) <= k:
        return {norm}
    return {norm[i : i + k] for i in range(len(norm) - k + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass(frozen=True)
class Duplicate:
    kept_id: str
    similarity: float  # 1.0 for an exact duplicate

    @property
    def reason(self) -> str:
        if self.similarity >= 1.0:
            return f"exact duplicate of {self.kept_id}"
        return f"near duplicate of {self.kept_id} (Jaccard {self.similarity:.2f})"


def find_duplicates(
    items: Iterable[tuple[str, str]], threshold: float = 0.7, shingle_chars: int = 5, num_perm: int = 128
) -> dict[str, Duplicate]:
    """(id, text) pairs in keep-first order -> {duplicate id: Duplicate naming the kept twin}."""
    from datasketch import MinHash, MinHashLSH

    if not 0 < threshold <= 1:
        raise ValueError(f"dedup threshold must be in (0, 1], got {threshold}")
    exact: dict[str, str] = {}
    kept_shingles: dict[str, set[str]] = {}
    # Recall over precision: a false candidate costs one exact Jaccard, a missed one leaves a twin.
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95)) if threshold < 1 else None
    found: dict[str, Duplicate] = {}
    for item_id, text in items:
        key = normalise(text)
        if key in exact:
            found[item_id] = Duplicate(exact[key], 1.0)
            continue
        exact[key] = item_id
        if lsh is None:
            continue
        grams = shingles(text, shingle_chars)
        signature = MinHash(num_perm=num_perm, seed=1)
        signature.update_batch([g.encode() for g in grams])
        best: Optional[tuple[float, str]] = None
        for candidate in lsh.query(signature):
            similarity = jaccard(grams, kept_shingles[candidate])
            if similarity >= threshold and (best is None or (similarity, candidate) > best):
                best = (similarity, candidate)
        if best is not None:
            found[item_id] = Duplicate(best[1], min(best[0], 0.9999))
            continue
        lsh.insert(item_id, signature)
        kept_shingles[item_id] = grams
    return found


def diversity(texts: list[str]) -> dict:
    """How varied a set of instructions is: distinct word n-grams over all n-grams (1.0: no repeats)."""
    words = [normalise(t).split() for t in texts]
    out: dict = {"count": len(texts), "mean_words": round(sum(map(len, words)) / len(words), 1) if words else 0.0}
    for n in (1, 2, 3):
        grams = [tuple(w[i : i + n]) for w in words for i in range(len(w) - n + 1)]
        out[f"distinct_{n}"] = round(len(set(grams)) / len(grams), 3) if grams else 0.0
    return out


def diversity_by(groups: Iterable[tuple[str, str]]) -> dict[str, dict]:
    """(group, text) pairs -> {group: diversity(...)}, groups sorted, plus "all"."""
    by: dict[str, list[str]] = defaultdict(list)
    for group, text in groups:
        by[group].append(text)
    result = {g: diversity(by[g]) for g in sorted(by)}
    if by:
        result["all"] = diversity([t for g in sorted(by) for t in by[g]])
    return result
