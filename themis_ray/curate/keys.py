"""Per-row keys the curation decides by: seeded hashes of ids, and sortable keys for exact cuts.

- `unit(ids, seed, purpose)`: a number uniform in [0, 1) per id, from a seeded digest of the id. A row
  is kept by a sampling rule when its number is below the rule's keep fraction, so the decision needs
  only the row and a few figures, is the same in every block, process and run, and different purposes
  (rebalancing, scenario mix, split, each augmentation) draw independent numbers.
- `desc_keys(values, ids)`: strings whose ascending order is the values' descending order, ties broken
  by id (NaN last). The first 16 characters encode the value, the rest is the id, so a cut is one key:
  a row is above it when its key is smaller.
- `split_keys(ids, docs, instructions, seed)`: the split's draws of the row's source document, its
  instruction and itself, 16 hex characters each, then the id: the order in which a scenario's rows go
  to validation when the split is exact. Rows of one document sort together, and within it the rows
  of one instruction, so a cut between groups puts each group wholly on one side.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

_SIGN = np.uint64(1 << 63)
_NAN_KEY = (1 << 64) - 1  # last in the descending order
VALUE_CHARS = 16  # hex characters of a key that encode the value
SPLIT_LEVELS = ("document", "instruction", "record")  # the groups a split key sorts by, coarsest first


def id_hashes(ids: Sequence[str]) -> np.ndarray:
    """A 64-bit digest of every id (blake2b: stable across processes, platforms and Python versions),
    computed once per row; every seeded draw mixes it with its own salt."""
    blob = b"".join(hashlib.blake2b(str(i).encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(blob, dtype=">u8").astype(np.uint64)


def _salt(seed: int, purpose: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(f"{seed}\x1f{purpose}".encode(), digest_size=8).digest(), "big"))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of 64-bit integers that scatters every input bit."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def draws(hashes: np.ndarray, seed: int, purpose: str) -> np.ndarray:
    """64-bit seeded draws, one per id digest (`id_hashes`), independent across seeds and purposes."""
    return _mix(np.asarray(hashes, dtype=np.uint64) ^ _salt(seed, purpose))


def unit_of(hashes: np.ndarray, seed: int, purpose: str) -> np.ndarray:
    """Uniform in [0, 1) per id digest: the draw's top 53 bits over 2**53 (exact in a float64)."""
    return (draws(hashes, seed, purpose) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def unit(ids: Sequence[str], seed: int, purpose: str) -> np.ndarray:
    return unit_of(id_hashes(ids), seed, purpose)


def row_seed(row_id: str, seed: int, purpose: str) -> int:
    """A seed for a row's own random choices (an augmentation's variant, say)."""
    return int(draws(id_hashes([row_id]), seed, purpose)[0])


def split_keys(ids: Sequence[str], docs: Sequence[str], instructions: Sequence[str], seed: int) -> list[str]:
    """The split draws of each row's document, instruction and id (16 hex characters each), then the
    id: sorted, the order rows go to validation."""
    levels = [draws(id_hashes(values), seed, "split").tolist() for values in (docs, instructions, ids)]
    return ["".join(f"{int(k):016x}" for k in ks) + i for *ks, i in zip(*levels, ids)]


def id_of_split_key(key: str) -> str:
    return key[VALUE_CHARS * len(SPLIT_LEVELS):]


def split_level_prefix(key: str, level: str) -> str:
    """The part of a split key that names the row's group at `level` (and the groups above it)."""
    return key[:VALUE_CHARS * (SPLIT_LEVELS.index(level) + 1)]


def _ordered_bits(values: np.ndarray) -> np.ndarray:
    """float64 -> uint64 whose unsigned order is the floats' order."""
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    negative = (bits & _SIGN) != 0
    return np.where(negative, ~bits, bits | _SIGN)


def desc_keys(values: np.ndarray, ids: Sequence[str]) -> list[str]:
    """Keys in ascending order = values in descending order, then ids ascending; NaN (or null) last."""
    values = np.asarray(values, dtype=np.float64)
    desc = ~_ordered_bits(values)
    nan = np.isnan(values)
    return [f"{_NAN_KEY if n else int(k):016x}{i}" for k, n, i in zip(desc.tolist(), nan.tolist(), ids)]


def value_of_desc_key(key: str) -> float:
    """The value a descending key encodes (NaN for the NaN key)."""
    desc = int(key[:VALUE_CHARS], 16)
    if desc == _NAN_KEY:
        return float("nan")
    ordered = np.uint64(~np.uint64(desc))
    bits = ordered & ~_SIGN if ordered & _SIGN else ~ordered
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])
