"""Duplicate instructions and the diversity of what is left.

Exact duplicates are equal after case, whitespace and punctuation are normalised. Near-duplicates
share most of their character shingles: MinHash LSH (datasketch) proposes candidates, and the exact
Jaccard similarity of the shingle sets decides, so the threshold means what it says.

The rule, the same in one process (`find_duplicates`) and at scale (`bucket_keys` + `bucket_duplicates`
over a Ray Data groupby): an instruction is a duplicate when an earlier one (keep-first order; ids at
scale) is equal or similar to it, and it names its most similar earlier twin (the earliest on ties).
Every pair is judged on its own, so no kept instruction has a similar kept twin, and a chain a ~ b ~ c
keeps only a even when c is not similar to a. At scale, each instruction goes to one bucket per LSH
band (and one for its normalised text); a groupby brings each bucket's instructions together, and only
those are compared, so the work grows with the candidates, not with the square of the instructions.
"""

from __future__ import annotations

import hashlib
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


def _lsh(threshold: float, num_perm: int):
    from datasketch import MinHashLSH

    if not 0 < threshold <= 1:
        raise ValueError(f"dedup threshold must be in (0, 1], got {threshold}")
    # Recall over precision: a false candidate costs one exact Jaccard, a missed one leaves a twin.
    return MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95)) if threshold < 1 else None


def _signature(grams: set[str], num_perm: int):
    from datasketch import MinHash

    signature = MinHash(num_perm=num_perm, seed=1)
    signature.update_batch([g.encode() for g in grams])
    return signature


def _better(candidate: tuple[float, int], best: Optional[tuple[float, int]]) -> bool:
    """(similarity, order of the twin): higher similarity wins, then the earlier twin."""
    return best is None or candidate[0] > best[0] or (candidate[0] == best[0] and candidate[1] < best[1])


def find_duplicates(
    items: Iterable[tuple[str, str]], threshold: float = 0.7, shingle_chars: int = 5, num_perm: int = 128
) -> dict[str, Duplicate]:
    """(id, text) pairs in keep-first order -> {duplicate id: Duplicate naming its twin}, in one process."""
    lsh = _lsh(threshold, num_perm)
    first_of: dict[str, int] = {}  # normalised text -> position of its first occurrence
    ids: list[str] = []
    grams_of: list[set[str]] = []
    found: dict[str, Duplicate] = {}
    for position, (item_id, text) in enumerate(items):
        ids.append(item_id)
        key, grams = normalise(text), shingles(text, shingle_chars)
        grams_of.append(grams)
        if key in first_of:
            found[item_id] = Duplicate(ids[first_of[key]], 1.0)
        first_of.setdefault(key, position)
        if lsh is None:
            continue
        signature = _signature(grams, num_perm)
        if item_id not in found:
            best = None
            for earlier in lsh.query(signature):
                similarity = jaccard(grams, grams_of[earlier])
                if similarity >= threshold and _better((similarity, earlier), best):
                    best = (similarity, earlier)
            if best is not None:
                found[item_id] = Duplicate(ids[best[1]], min(best[0], 0.9999))
        lsh.insert(position, signature)
    return found


def bucket_keys(text: str, threshold: float = 0.7, shingle_chars: int = 5, num_perm: int = 128) -> list[str]:
    """The buckets an instruction goes to: its normalised text, and one per LSH band of its MinHash.
    Two instructions are compared only when they share a bucket (the same candidates LSH proposes)."""
    keys = ["x" + hashlib.sha1(normalise(text).encode()).hexdigest()]
    lsh = _lsh(threshold, num_perm)
    if lsh is not None:
        values = _signature(shingles(text, shingle_chars), num_perm).hashvalues
        keys += [f"{band}:" + hashlib.sha1(values[band * lsh.r:(band + 1) * lsh.r].tobytes()).hexdigest()
                 for band in range(lsh.b)]
    return keys


def bucket_duplicates(members: list[tuple[str, str]], exact: bool, threshold: float = 0.7,
                      shingle_chars: int = 5) -> list[tuple[str, str, float]]:
    """(id, text) of one bucket -> (duplicate id, twin id, similarity) for each member with an earlier
    (smaller id) similar member: the most similar, the earliest on ties. In an exact bucket every
    member after the first duplicates the first."""
    members = sorted(members)
    if exact:
        return [(item_id, members[0][0], 1.0) for item_id, _ in members[1:]]
    grams = [shingles(text, shingle_chars) for _, text in members]
    edges = []
    for j in range(1, len(members)):
        best = None
        for i in range(j):
            similarity = jaccard(grams[j], grams[i])
            if similarity >= threshold and _better((similarity, i), best):
                best = (similarity, i)
        if best is not None:
            edges.append((members[j][0], members[best[1]][0], min(best[0], 0.9999)))
    return edges


def strongest(edges: Iterable[tuple[str, str, float]]) -> dict[str, Duplicate]:
    """Edges from every bucket -> one Duplicate per duplicate id: the most similar twin, the earliest
    on ties (an exact twin, similarity 1.0, beats any near one)."""
    found: dict[str, Duplicate] = {}
    for item_id, twin, similarity in edges:
        best = found.get(item_id)
        if best is None or similarity > best.similarity or (similarity == best.similarity and twin < best.kept_id):
            found[item_id] = Duplicate(twin, similarity)
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
