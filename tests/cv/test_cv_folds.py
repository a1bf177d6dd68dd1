from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lossdiag.cv import CVError, kfold_indices, stratified_kfold_indices
from lightning_lossdiag.cv.folds import class_counts


def _check_partition(folds, n, k):
    assert len(folds) == k
    vals = [set(f.val) for f in folds]
    for i in range(k):
        for j in range(i + 1, k):
            assert not vals[i] & vals[j], f"folds {i} and {j} share validation rows"
    assert set().union(*vals) == set(range(n))
    assert sum(len(f.val) for f in folds) == n
    for f in folds:
        assert f.val, "every fold validates on at least one row"
        assert f.train == sorted(set(range(n)) - set(f.val))
        assert f.val == sorted(f.val)
    sizes = [len(f.val) for f in folds]
    assert max(sizes) - min(sizes) <= 1


@st.composite
def _n_and_k(draw):
    n = draw(st.integers(min_value=2, max_value=300))
    k = draw(st.integers(min_value=2, max_value=min(n, 20)))
    return n, k


@settings(max_examples=60, deadline=None)
@given(nk=_n_and_k(), seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_kfold_is_a_partition_with_balanced_sizes(nk, seed):
    n, k = nk
    _check_partition(kfold_indices(n, k, seed=seed), n, k)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(min_value=0, max_value=4), min_size=2, max_size=200),
    k_raw=st.integers(min_value=2, max_value=12),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_stratified_keeps_class_shares_within_one_row(labels, k_raw, seed):
    n = len(labels)
    k = min(k_raw, n)
    folds = stratified_kfold_indices(labels, k, seed=seed)
    _check_partition(folds, n, k)
    totals = Counter(labels)
    for f in folds:
        in_fold = Counter(labels[i] for i in f.val)
        for cls, total in totals.items():
            ideal = total / k
            assert abs(in_fold[cls] - ideal) < 1, (cls, in_fold[cls], ideal)
            assert in_fold[cls] in (math.floor(ideal), math.ceil(ideal))


def test_stratified_imbalanced_example_shares():
    # 90 negatives, 10 positives, 5 folds: every fold validates on 18 negatives and 2 positives
    labels = [0] * 90 + [1] * 10
    for f in stratified_kfold_indices(labels, 5, seed=3):
        assert Counter(labels[i] for i in f.val) == {0: 18, 1: 2}


def test_same_seed_same_folds_other_seed_other_folds():
    assert kfold_indices(50, 5, seed=7) == kfold_indices(50, 5, seed=7)
    assert kfold_indices(50, 5, seed=7) != kfold_indices(50, 5, seed=8)
    labels = [i % 3 for i in range(60)]
    assert stratified_kfold_indices(labels, 4, seed=7) == stratified_kfold_indices(labels, 4, seed=7)
    assert stratified_kfold_indices(labels, 4, seed=7) != stratified_kfold_indices(labels, 4, seed=8)


def test_kfold_shuffles_rows():
    # not the contiguous blocks an unshuffled split would give
    first = kfold_indices(100, 4, seed=0)[0].val
    assert first != list(range(25))


def test_stratified_accepts_tensors_and_arrays_like_lists():
    labels = [0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2]
    expected = stratified_kfold_indices(labels, 3, seed=1)
    assert stratified_kfold_indices(torch.tensor(labels), 3, seed=1) == expected
    assert stratified_kfold_indices(np.array(labels), 3, seed=1) == expected


def test_class_counts_matches_counter():
    labels = [2, 0, 1, 1, 2, 2, 0]
    rows = [0, 1, 4, 5, 6]
    expected = Counter(labels[i] for i in rows)
    assert class_counts(labels, rows) == {str(c): expected[c] for c in sorted(expected)}


@pytest.mark.parametrize(
    ("n", "k", "match"),
    [
        pytest.param(10, 1, r"`k` \(the number of folds\) must be an integer >= 2, got 1", id="k<2"),
        pytest.param(10, 11, r"must not exceed the number of rows \(10\), got 11", id="k>n"),
        pytest.param(-1, 2, r"`n` .* non-negative integer, got -1", id="negative-n"),
    ],
)
def test_kfold_rejects_bad_k(n, k, match):
    with pytest.raises(CVError, match=match):
        kfold_indices(n, k)


def test_stratified_rejects_bad_input():
    with pytest.raises(CVError, match=r"must not exceed the number of rows \(3\), got 4"):
        stratified_kfold_indices([0, 1, 0], 4)
    with pytest.raises(CVError, match=r"1-D sequence\), got shape \(2, 2\)"):
        stratified_kfold_indices([[0, 1], [1, 0]], 2)
