"""Exact and near-duplicate instructions on crafted twins; the diversity summary by hand."""

from __future__ import annotations

import pytest

from themis_ray.dedup import diversity, diversity_by, find_duplicates, jaccard, normalise, shingles

BASE = "Explain what a Python generator is and when you would use one instead of a list."
DISTINCT = [
    "Translate into French: 'The interpreter reads the file line by line.'",
    "Write a short poem about a loop that never ends.",
    "What is 17 times 23? Show your working.",
    "You are a patient tutor. A student asks why their variable is not updated inside a function.",
]


def test_normalise_ignores_case_spacing_and_punctuation():
    assert normalise("  Hello,   WORLD!! ") == "hello world"
    assert normalise("a-b") == "a b"


def test_exact_duplicates_name_the_first_seen():
    items = [("a", BASE), ("b", BASE.upper() + "  "), ("c", DISTINCT[0]), ("d", BASE.replace(",", ""))]
    found = find_duplicates(items)
    assert set(found) == {"b", "d"}
    assert found["b"].kept_id == "a" and found["b"].similarity == 1.0
    assert found["b"].reason == "exact duplicate of a"


def test_near_duplicates_are_found_and_distinct_instructions_kept():
    near = [
        BASE.replace("Explain", "Describe"),  # one word changed
        BASE.replace(" instead of a list", " instead of a plain list"),  # one word added
        BASE[:-1] + " in practice.",  # a tail added
    ]
    items = [("base", BASE)] + [(f"near{i}", t) for i, t in enumerate(near)] + [
        (f"other{i}", t) for i, t in enumerate(DISTINCT)
    ]
    found = find_duplicates(items, threshold=0.7)
    assert set(found) == {"near0", "near1", "near2"}
    for dup_id, dup in found.items():
        assert dup.kept_id == "base"
        text = dict(items)[dup_id]
        # the reported similarity is the exact Jaccard of the shingle sets, and at least the threshold
        assert dup.similarity == pytest.approx(jaccard(shingles(text, 5), shingles(BASE, 5)), abs=1e-3)
        assert 0.7 <= dup.similarity < 1.0
        assert dup.reason.startswith("near duplicate of base (Jaccard 0.")


def test_threshold_decides():
    twin = BASE.replace("generator", "coroutine")
    sim = jaccard(shingles(twin, 5), shingles(BASE, 5))
    assert 0.5 < sim < 0.95
    assert "t" in find_duplicates([("b", BASE), ("t", twin)], threshold=sim - 0.05)
    assert find_duplicates([("b", BASE), ("t", twin)], threshold=min(1.0, sim + 0.05)) == {}
    # threshold 1: exact duplicates only
    assert find_duplicates([("b", BASE), ("t", twin), ("e", BASE)], threshold=1.0).keys() == {"e"}


def test_keep_first_order_decides_which_twin_stays():
    twin = BASE.replace("Explain", "Describe")
    assert find_duplicates([("x", twin), ("y", BASE)])["y"].kept_id == "x"
    assert find_duplicates([("y", BASE), ("x", twin)])["x"].kept_id == "y"


def test_bad_threshold_is_a_clear_error():
    with pytest.raises(ValueError, match="threshold"):
        find_duplicates([("a", BASE)], threshold=0)


def test_diversity_by_hand():
    d = diversity(["a b a", "a b"])
    # unigrams: a b a a b -> 2 distinct of 5; bigrams: ab ba ab -> 2 of 3; trigrams: aba -> 1 of 1
    assert d == {"count": 2, "mean_words": 2.5, "distinct_1": 0.4, "distinct_2": 0.667, "distinct_3": 1.0}
    assert diversity([]) == {"count": 0, "mean_words": 0.0, "distinct_1": 0.0, "distinct_2": 0.0,
                             "distinct_3": 0.0}


def test_repetitive_sets_score_lower_than_varied_ones():
    repetitive = [f"Write a short poem about {x}." for x in ("cats", "dogs", "rain", "loops")]
    assert diversity(repetitive)["distinct_2"] < diversity(DISTINCT)["distinct_2"]
    by = diversity_by([("poems", t) for t in repetitive] + [("mixed", t) for t in DISTINCT])
    assert list(by) == ["mixed", "poems", "all"]
    assert by["all"]["count"] == 8 and by["poems"]["count"] == 4
