"""Dataset-level steps of `dsft data prepare`: dedup, split, contamination check, balance."""

import random
from collections import Counter

import pytest

from dsft.data.balance import class_distribution, rebalance_indices
from dsft.data.dedup import DuplicateFinder, normalize_for_dedup
from dsft.data.prepare_config import DedupStep
from dsft.data.split import find_contamination, overlap_tokens, split_indices

WORDS = [letter * 3 for letter in "abcdefghijklmnopqrstuvwxyz"]
HAN = "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳云腾致雨露结为霜金生丽水玉出昆冈剑号巨阙珠称夜光"


def _sentence(seed: int, words: int = 40) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(words))


def _chinese(seed: int, chars: int = 60) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(HAN) for _ in range(chars))


def _corpus() -> tuple[list[str], dict[int, tuple[int, str]]]:
    """Texts with planted duplicates, and the expected {duplicate index: (kept index, kind)}."""
    base = _sentence(1)
    words = base.split()
    near = " ".join(words[:20] + ["changed"] + words[21:])
    # 120 characters: one changed character then alters 5 of ~115 shingles (Jaccard ~0.92), clear
    # of the 0.8 threshold; at 60 characters (~0.84) MinHash's estimate straddles it.
    chinese = _chinese(2, chars=120)
    chinese_near = chinese[:60] + "龙" + chinese[61:]
    texts = [
        base,
        _sentence(3),
        chinese,
        "  " + base.upper().replace(" ", "   ") + "\n",
        near,
        _sentence(4),
        chinese_near,
        "ＡＢＣ def",
        "abc   DEF",
        _chinese(5),
    ]
    expected = {3: (0, "exact"), 4: (0, "near"), 6: (2, "near"), 8: (7, "exact")}
    return texts, expected


def _run_dedup(texts: list[str], step: DedupStep) -> dict[int, tuple[int, str]]:
    finder = DuplicateFinder(step)
    found = {index: finder.add(index, text) for index, text in enumerate(texts)}
    duplicates = finder.result()
    assert {i: (duplicates.duplicate_of[i], duplicates.kind[i]) for i in duplicates.duplicate_of} == {
        i: hit for i, hit in found.items() if hit is not None
    }
    return {i: hit for i, hit in found.items() if hit is not None}


def test_normalize_for_dedup():
    assert normalize_for_dedup("  Ｈｅｌｌｏ\t\tWORLD\n straße ") == "hello world strasse"


def test_dedup_finds_planted_exact_and_near_duplicates_and_keeps_the_first():
    texts, expected = _corpus()
    assert _run_dedup(texts, DedupStep(step="dedup")) == expected


def test_dedup_is_deterministic_and_keeps_distinct_texts():
    distinct = [_sentence(seed) for seed in range(10, 60)] + [_chinese(seed) for seed in range(10, 40)]
    assert _run_dedup(distinct, DedupStep(step="dedup")) == {}
    texts, _ = _corpus()
    assert _run_dedup(texts, DedupStep(step="dedup")) == _run_dedup(texts, DedupStep(step="dedup"))


def test_dedup_switches():
    texts, expected = _corpus()
    exact_only = {i: hit for i, hit in expected.items() if hit[1] == "exact"}
    assert _run_dedup(texts, DedupStep(step="dedup", near=False)) == exact_only
    # Without the exact check, identical normalized texts are still caught by MinHash.
    near_only = {i: (kept, "near") for i, (kept, _) in expected.items()}
    assert _run_dedup(texts, DedupStep(step="dedup", exact=False)) == near_only
    assert _run_dedup(texts, DedupStep(step="dedup", exact=False, near=False)) == {}


def test_dedup_short_texts_and_index_order():
    finder = DuplicateFinder(DedupStep(step="dedup", exact=False, shingle_chars=5))
    assert finder.add(0, "ab") is None
    assert finder.add(1, "AB") == (0, "near")
    with pytest.raises(ValueError, match="increase"):
        finder.add(1, "x")


def test_split_sizes_disjoint_and_deterministic():
    parts = split_indices(100, 0.1, 0.2, seed=3)
    assert [len(parts[name]) for name in ("train", "validation", "test")] == [70, 10, 20]
    assert sorted(parts["train"] + parts["validation"] + parts["test"]) == list(range(100))
    assert all(parts[name] == sorted(parts[name]) for name in parts)
    assert split_indices(100, 0.1, 0.2, seed=3) == parts
    assert split_indices(100, 0.1, 0.2, seed=4) != parts


def test_split_edges():
    assert split_indices(0, 0.1, 0.1, seed=0) == {"train": [], "validation": [], "test": []}
    assert split_indices(1, 0.4, 0.4, seed=0) == {"train": [0], "validation": [], "test": []}
    two = split_indices(2, 0.4, 0.4, seed=0)
    assert (len(two["train"]), len(two["validation"]), len(two["test"])) == (1, 1, 0)
    assert split_indices(5, 0.0, 0.0, seed=0) == {"train": [0, 1, 2, 3, 4], "validation": [], "test": []}
    with pytest.raises(ValueError, match="leave records"):
        split_indices(10, 0.5, 0.5, seed=0)
    with pytest.raises(ValueError, match="labels has 2 entries"):
        split_indices(3, 0.1, 0.1, seed=0, labels=["a", "b"])


def test_split_stratified_keeps_label_proportions():
    labels = ["a"] * 60 + ["b"] * 30 + [None] * 10
    parts = split_indices(100, 0.1, 0.2, seed=0, labels=labels)
    counts = {name: Counter(labels[i] for i in indices) for name, indices in parts.items()}
    assert counts["validation"] == {"a": 6, "b": 3, None: 1}
    assert counts["test"] == {"a": 12, "b": 6, None: 2}
    assert counts["train"] == {"a": 42, "b": 21, None: 7}


def test_split_groups_never_straddle_splits():
    groups = [f"user{i // 4}" for i in range(80)] + [None] * 20
    parts = split_indices(100, 0.1, 0.1, seed=1, groups=groups)
    split_of_group: dict[str, set[str]] = {}
    for name, indices in parts.items():
        for index in indices:
            split_of_group.setdefault(groups[index] or f"record{index}", set()).add(name)
    assert all(len(names) == 1 for names in split_of_group.values())
    assert (len(parts["validation"]), len(parts["test"])) == (10, 10)
    assert sorted(index for indices in parts.values() for index in indices) == list(range(100))


def test_split_one_big_group_stays_in_train():
    parts = split_indices(10, 0.3, 0.3, seed=0, groups=["g"] * 10)
    assert parts == {"train": list(range(10)), "validation": [], "test": []}


def test_overlap_tokens():
    assert overlap_tokens("Hello, 世界! ｆｏｏ_bar 42") == ["hello", "世", "界", "foo_bar", "42"]


def test_contamination_exact_and_ngram_leaks():
    train = [_sentence(1), _chinese(2), "short text"]
    partial_en = " ".join(train[0].split()[5:20]) + " " + _sentence(7, words=15)
    partial_zh = _chinese(8, chars=10) + train[1][20:35] + _chinese(9, chars=10)
    validation = [train[0].upper(), _sentence(6), partial_en]
    test = [partial_zh, " SHORT   text ", "short", _chinese(10)]
    leaks = find_contamination(train, {"validation": validation, "test": test}, ngram=5)
    found = [(leak.split, leak.index, leak.kind, leak.train_index) for leak in leaks]
    assert found == [
        ("validation", 0, "exact", 0),
        ("validation", 2, "ngram", 0),
        ("test", 0, "ngram", 1),
        ("test", 1, "exact", 2),
    ]
    assert leaks[0].overlap == 1.0
    # 15 shared words give 11 shared 5-grams of the 26 in a 30-word record (random tails may add none).
    assert leaks[1].overlap == pytest.approx(11 / 26)
    assert leaks[2].overlap == pytest.approx(11 / 31)


def test_contamination_overlap_exact_small_case():
    leaks = find_contamination(["a b c d e"], {"test": ["x b c d y", "b c d", "q r s"]}, ngram=3)
    assert [(leak.index, leak.kind, leak.train_index, leak.overlap) for leak in leaks] == [
        (0, "ngram", 0, pytest.approx(1 / 3)),
        (1, "ngram", 0, 1.0),
    ]


def test_class_distribution():
    assert class_distribution(["b", "a", None, "b"]) == {"(none)": 1, "a": 1, "b": 2}
    assert list(class_distribution(["b", "a", None, "b"])) == ["(none)", "a", "b"]


def test_rebalance_undersample_exact_counts():
    labels = ["big"] * 10 + ["small"] * 2
    kept = rebalance_indices(labels, max_ratio=3.0, method="undersample", seed=0)
    assert Counter(labels[i] for i in kept) == {"big": 6, "small": 2}
    assert kept == sorted(kept) and len(set(kept)) == len(kept)
    assert {10, 11} <= set(kept)
    assert rebalance_indices(labels, 3.0, "undersample", seed=0) == kept


def test_rebalance_oversample_exact_counts():
    labels = ["big"] * 10 + ["small"] * 2
    out = rebalance_indices(labels, max_ratio=3.0, method="oversample", seed=0)
    assert Counter(labels[i] for i in out) == {"big": 10, "small": 4}
    assert out[:10] == list(range(10)) and out[10:] == [10, 10, 11, 11]


@pytest.mark.parametrize("method", ["undersample", "oversample"])
def test_rebalance_bounds_the_ratio(method):
    rng = random.Random(0)
    labels = [rng.choice("aaaaaaaaabbbc") for _ in range(200)]
    for max_ratio in (1.0, 1.5, 2.0, 3.0):
        counts = Counter(labels[i] for i in rebalance_indices(labels, max_ratio, method, seed=1))
        assert max(counts.values()) <= max_ratio * min(counts.values())
        assert set(counts) == {"a", "b", "c"}


def test_rebalance_errors():
    with pytest.raises(ValueError, match="max_ratio"):
        rebalance_indices(["a"], 0.5, "undersample", seed=0)
    with pytest.raises(ValueError, match="method"):
        rebalance_indices(["a"], 2.0, "smote", seed=0)
    assert rebalance_indices([], 2.0, "oversample", seed=0) == []
