"""Row operations of the class engine against torch's own: byte counts, row losses, kept scratch buffers."""

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from lightning_lossdiag.stats import row_ops
from lightning_lossdiag.stats.row_ops import Workspace, count_true, row_nll


@pytest.mark.parametrize("shape", [(1024, 1000), (255, 7), (256, 3), (3, 700), (4, 511, 2), (0, 5), (510, 2)])
def test_byte_counts_equal_torch_sums_along_every_dim(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) < 0.7  # long runs of True: a byte that overflowed would show
    for dim in range(len(shape)):
        counts = count_true(mask, dim)
        assert counts.dtype == torch.int32
        assert torch.equal(counts, mask.sum(dim).int()), dim


def test_a_full_column_of_many_rows_is_counted_exactly():
    mask = torch.ones(70_000, 2, dtype=torch.bool)  # 274 blocks of 255 and a remainder
    assert count_true(mask, 0).tolist() == [70_000, 70_000]


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((64, 300), torch.float32), ((5, 30, 40), torch.float64), ((1, 30, 40), torch.float32)],
    ids=["rows", "dense", "one_image"],
)
def test_row_losses_equal_the_cross_entropy_with_and_without_kept_buffers(monkeypatch, shape, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g, dtype=dtype) * 5
    target_shape = (shape[0], *shape[2:])
    t = torch.randint(0, shape[1], target_shape, generator=g)
    expected = F.cross_entropy(x, t, reduction="none").reshape(-1)
    work = Workspace(torch.device("cpu"))
    for values in (row_ops._NLL_VALUES, 1_000):  # one piece, then many (a ragged last one)
        monkeypatch.setattr(row_ops, "_NLL_VALUES", values)
        for kept in (None, work):
            torch.testing.assert_close(row_nll(x, t, False, kept), expected)
    assert work.nbytes > 0  # the log-softmax went into a kept buffer


def test_a_log_softmax_above_the_kept_size_is_not_kept(monkeypatch):
    monkeypatch.setattr(row_ops, "_KEPT_VALUES", 100)
    work = Workspace(torch.device("cpu"))
    x, t = torch.randn(20, 10), torch.randint(0, 10, (20,))
    torch.testing.assert_close(row_nll(x, t, False, work), F.cross_entropy(x, t, reduction="none"))
    assert work.nbytes == 0  # 200 scores: computed in a fresh tensor, nothing held afterwards


def test_a_workspace_grows_once_and_reuses_its_buffer():
    work = Workspace(torch.device("cpu"))
    work.take("a", (4, 4), torch.float32)
    large = work.take("a", (8, 8), torch.float32)  # grown
    again = work.take("a", (2, 8), torch.float32)  # fits: the same memory
    assert large.data_ptr() == again.data_ptr()
    assert work.nbytes == 64 * 4
    assert work.take("a", (3,), torch.float64).dtype == torch.float64  # another dtype: a buffer of its own kind


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_comparisons_count_and_find_what_bool_ones_do_on_ties_nan_and_inf(dtype):
    # the CPU compares into a kept float buffer (0/1 values, summed as floats): the counts and the first maxima must be
    # those of the bool comparisons they replace, on ties, NaN and infinities, rows and dense scores alike
    g = torch.Generator().manual_seed(3)
    ws = Workspace(torch.device("cpu"))
    rows = torch.randn(40, 700, generator=g).round().to(dtype)  # ties everywhere
    rows[0, :3] = float("nan")
    rows[1, 5], rows[2, 9] = float("inf"), -float("inf")
    ref = rows.gather(1, torch.randint(0, 700, (40, 1), generator=g))
    counted = row_ops.count_above(rows, ref, 1, ws)
    assert counted.is_floating_point()  # the float path was taken
    assert torch.equal(counted.long(), (rows > ref).sum(1))
    dense = torch.randn(3, 21, 50, generator=g).round().to(dtype)
    dense[0, :, 4] = float("nan")  # a NaN pixel: the last class, as the bool path says
    dense[1, 3, 7] = float("nan")
    top = dense.amax(1)
    exact = row_ops.descending_weights(21, 3, 1, dense.device, exact=True)
    found = row_ops.first_hit(dense, 1, top, exact, ws)
    assert torch.equal(found, row_ops.first_hit(dense, 1, top))
    finite = ~dense.isnan().any(1)
    assert torch.equal(found[finite], dense.argmax(1)[finite])
    assert torch.equal(row_ops.count_above(dense, top.unsqueeze(1), 1, ws).long(), (dense > top.unsqueeze(1)).sum(1))
    assert set(ws._buffers) == {row_ops.SCRATCH}  # one kept buffer for every comparison


def test_a_comparison_too_large_for_the_kept_buffer_counts_bools(monkeypatch):
    monkeypatch.setattr(row_ops, "_KEPT_VALUES", 100)
    ws = Workspace(torch.device("cpu"))
    x = torch.randn(20, 30)
    counted = row_ops.count_above(x, x[:, :1], 1, ws)
    assert counted.dtype == torch.int32
    assert not ws._buffers
    assert torch.equal(counted.long(), (x > x[:, :1]).sum(1))
