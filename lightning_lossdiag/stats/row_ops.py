"""Per-row operations of the class engine: maxima and first argmax, top-k membership, row losses, byte counts.

Each finds a per-row value of ``(M, C)`` rows or ``(A, C, L)`` dense scores with few kernels and small temporaries
(the CPU's ``argmax`` over a dim that is not the last, int64 copies of masks and fresh full-size buffers are what they
avoid). None reads the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from lightning_lossdiag.stats.curves import by_lookup  # the one switch between the CPU's paths and a GPU's

ARGMAX_CHUNK = 64
_KEPT_VALUES = 2**20  # the largest full-size float temporary written into a kept buffer (a log-softmax, a comparison)
SCRATCH = "scores"  # the kept buffer of full-size float temporaries: the log-softmax pieces and the CPU's comparisons
# scores per piece of the row losses. On the CPU a piece fits the kept buffer (4 MiB of float32, in cache: ~10 %
# less time for a (256, 32000) update than 16 MiB pieces); off the CPU 16M (64 MiB): fewer, larger kernels
_NLL_VALUES = 2**20
_NLL_VALUES_DEVICE = 2**24


def chunk_maxima(rows: Tensor) -> Tensor:
    """``(M, ceil(C / 64))`` maxima of the chunks of 64 scores of every row (the last chunk may be shorter)."""
    c = rows.shape[1]
    b = ARGMAX_CHUNK
    full = c - c % b
    chunks = rows.unfold(1, b, b).amax(-1)  # a view of the full chunks (no copy of the first `full` columns)
    if full < c:
        chunks = torch.cat([chunks, rows[:, full:].amax(-1, keepdim=True)], 1)
    return chunks


def max_in_chunks(rows: Tensor, chunks: Tensor, offsets: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The maximum of every row and its first index, given the :func:`chunk_maxima`.

    The first chunk holding the maximum is searched alone (64 values a row; ``offsets``: ``arange(64)`` on the device).
    """
    c = rows.shape[1]
    top, at = chunks.max(-1)  # the first chunk with the maximum
    if offsets is None:
        offsets = torch.arange(ARGMAX_CHUNK, device=rows.device)
    columns = torch.add(offsets, at[:, None], alpha=ARGMAX_CHUNK)
    inside = rows.gather(1, columns if c % ARGMAX_CHUNK == 0 else columns.clamp_(max=c - 1))
    return top, torch.add(inside.argmax(-1), at, alpha=ARGMAX_CHUNK)


def in_top_k_chunks(rows: Tensor, chunks: Tensor, picked: Tensor, k: int) -> Tensor:
    """``picked >= `` the k-th largest score of every row: the top k lie in the k chunks with the largest maxima."""
    m, c = rows.shape
    b = ARGMAX_CHUNK
    full = c - c % b
    best = chunks[:, : full // b].topk(min(k, full // b), dim=-1).indices  # the chunks that hold the k largest
    # the k chunks of each row, picked from a view of the full chunks (a gather with an expanded index, or a reshape
    # of the first `full` columns, would cost a copy of the whole rows on the CPU)
    candidates = rows.unfold(1, b, b)[torch.arange(m, device=rows.device)[:, None], best]  # (M, k, 64)
    above = candidates.gt_(picked[:, None, None]).sum((1, 2))  # 0/1 in place: a float comparison, not a bool mask
    if full < c:
        above += (rows[:, full:] > picked[:, None]).sum(1)
    return above < k  # fewer than k above it (a count: cheaper than a topk)


def first_hit(x: Tensor, dim: int, top: Tensor, weights: Tensor | None = None, work: Workspace | None = None) -> Tensor:
    """First index along ``dim`` (not the last) where ``x`` equals ``top = x.amax(dim)``.

    One comparison and an ``amax`` of descending class ``weights`` (:func:`descending_weights`): the CPU's
    ``argmax`` over a dim that is not the last costs several times more. With ``work`` (a CPU workspace) and float
    ``weights``, the comparison writes 0/1 floats into a kept buffer: the CPU writes a float comparison about 4x
    faster than a bool one.
    """
    c = x.shape[dim]
    if weights is None:
        weights = descending_weights(c, x.ndim, dim, x.device)
    buffer = _scratch(x, work) if weights.is_floating_point() else None
    if buffer is not None:
        hits = torch.ge(x, top.unsqueeze(dim), out=buffer).mul_(weights)
        return (c - hits.amax(dim).to(torch.long)).clamp_(max=c - 1)
    hits = x >= top.unsqueeze(dim)  # == where top is the maximum (a comparison the CPU makes faster)
    hits = hits.view(torch.uint8) if weights.dtype == torch.uint8 else hits
    return (c - (hits * weights).amax(dim).to(torch.long)).clamp_(max=c - 1)  # a NaN row: the last class


def count_above(x: Tensor, ref: Tensor, dim: int, work: Workspace | None = None) -> Tensor:
    """How many values of ``x`` along ``dim`` are strictly above ``ref`` (``x``'s shape with ``dim`` of size 1).

    On the CPU with ``work``, for float scores of at most ``_KEPT_VALUES`` values, the comparison writes 0/1 floats
    into the kept buffer :data:`SCRATCH` and they are summed as floats (exact up to 2**24 a row): a float comparison
    costs about a quarter of a bool one there, and a float sum half of a byte sum. Else a bool mask and
    :func:`count_true`. Counts as float or int32. No host read.

    Example:
        >>> x = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.7, 0.6]])
        >>> ws = Workspace(torch.device("cpu"))
        >>> count_above(x, x[:, 1:2], 1, ws).tolist(), count_above(x, x[:, 1:2], 1).tolist()
        ([0.0, 1.0], [0, 1])
    """
    buffer = _scratch(x, work)
    if buffer is not None:
        return torch.gt(x, ref, out=buffer).sum(dim)
    return count_true(x > ref, dim)


def fits_scratch(x: Tensor, work: Workspace | None) -> bool:
    """Whether :func:`count_above` and :func:`first_hit` compare ``x`` in floats (the CPU, at most 1M scores)."""
    return work is not None and by_lookup(x) and x.is_floating_point() and x.numel() <= _KEPT_VALUES


def _scratch(x: Tensor, work: Workspace | None) -> Tensor | None:
    """The kept float buffer of ``x``'s shape for a CPU comparison, or ``None`` (off the CPU, too large, not float)."""
    if work is None or not fits_scratch(x, work):
        return None
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    return work.take(SCRATCH, tuple(x.shape), dtype)


def descending_weights(c: int, ndim: int, dim: int, device: torch.device, *, exact: bool = False) -> Tensor:
    """``c - arange(c)`` in the smallest integer dtype, shaped to broadcast along ``dim`` of an ``ndim`` tensor.

    ``exact``: as float32 instead (exact up to 2**24 classes), for :func:`first_hit`'s float comparison.
    """
    shape = [1] * ndim
    shape[dim] = c
    dtype = torch.uint8 if c < 2**8 else torch.int16 if c < 2**15 else torch.int32
    weights = c - torch.arange(c, device=device, dtype=torch.int32)
    return (weights.float() if exact else weights.to(dtype)).view(shape)


def first_argmax(x: Tensor, dim: int, top: Tensor) -> Tensor:
    """``x.argmax(dim)`` (first maximum) given ``top = x.amax(dim)``, at a fraction of ``argmax``'s CPU cost.

    torch's CPU ``argmax``/``max`` with indices is several times slower than ``amax``: over a class dim that is not
    the last one (``(N, C, H, W)``), the first class whose value equals the maximum is found with one comparison and
    an ``amax`` of descending class weights; over a long last dim (512 classes or more, a 32k vocabulary), the
    maximum's chunk of 64 is found first and searched alone. Short last dims use ``argmax`` itself. No host read.

    Example:
        >>> x = torch.tensor([[[1.0, 5.0], [5.0, 2.0]], [[0.0, 5.0], [3.0, 1.0]]])  # (N=2, C=2, L=2)
        >>> first_argmax(x, 1, x.amax(1)).tolist()
        [[1, 0], [1, 0]]
    """
    c = x.shape[dim]
    if dim == x.ndim - 1:
        if c < 512:
            return x.argmax(dim)
        rows = x.reshape(-1, c)
        return max_in_chunks(rows, chunk_maxima(rows))[1].reshape(x.shape[:-1])
    return first_hit(x, dim, top)


def in_top_k(x: Tensor, dim: int, picked: Tensor, k: int) -> Tensor:
    """Whether fewer than ``k`` scores along ``dim`` are strictly above ``picked`` (the true class is in the top k).

    Over a long last dim (512 classes or more) the k-th largest score is found among the ``k`` chunks of 64 with the
    largest maxima (the top k values lie in them), so the work is an ``amax`` pass plus ``k x 64`` values a row;
    otherwise the scores above ``picked`` are counted in bytes. No host read.

    Example:
        >>> x = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.7, 0.6, 0.5]])
        >>> in_top_k(x, 1, torch.tensor([0.3, 0.5]), 2).tolist()
        [False, False]
        >>> in_top_k(x, 1, torch.tensor([0.5, 0.7]), 2).tolist()
        [True, True]
    """
    c = x.shape[dim]
    if dim != x.ndim - 1 or c < 512:
        return count_true(x > picked.unsqueeze(dim), dim) < k
    rows = x.reshape(-1, c)
    return in_top_k_chunks(rows, chunk_maxima(rows), picked.reshape(-1), k).reshape(picked.shape)


def row_nll(scores: Tensor, target: Tensor, low: bool, work: Workspace | None = None) -> Tensor:
    """``-log p(target)`` of every row, ``(M,)`` (targets in range), over pieces of at most ``_NLL_VALUES`` scores.

    The log-softmax is a float32 temporary the size of the scores: in pieces it stays below 4 MiB whatever the
    vocabulary (64 MiB off the CPU, where launches cost more than pages; a few more kernels, on outputs large enough
    that they do not show). With ``work``, a piece of up to 1M scores is written into a kept buffer (no fresh pages
    on the CPU, and a piece that stays in cache). ``low``: bf16/fp16 scores, read once in float32.

    Example:
        >>> x, t = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
        >>> torch.allclose(row_nll(x, t, False), F.cross_entropy(x, t, reduction="none"))
        True
    """
    dim = 0 if scores.shape[0] > 1 or scores.ndim == 2 else 2  # (M, C) or (A, C, L): rows, else positions
    limit = _NLL_VALUES if by_lookup(scores) else _NLL_VALUES_DEVICE  # a caching allocator: fewer launches
    pieces = max(1, min(scores.shape[dim], -(-scores.numel() // limit)))
    tdim = dim - 1 if dim else 0
    out = []
    for x, t in zip(scores.tensor_split(pieces, dim), target.tensor_split(pieces, tdim), strict=True):
        dtype = torch.float32 if low else x.dtype
        # a kept buffer up to 4 MiB (beyond, the compute outweighs the pages); half-to-float log-softmax: CUDA only
        kept = work is not None and x.numel() <= _KEPT_VALUES and (not low or x.is_cuda)
        buffer = work.take(SCRATCH, tuple(x.shape), dtype) if work is not None and kept else None
        log_p = torch.ops.aten._log_softmax.out(x, 1, low, out=buffer) if buffer is not None else None
        if log_p is None:
            log_p = F.log_softmax(x, 1, dtype=torch.float32) if low else F.log_softmax(x, 1)
        out.append(log_p.gather(1, t.unsqueeze(1)).squeeze(1).neg_())
    return (out[0] if pieces == 1 else torch.cat(out, tdim)).reshape(-1)


def count_true(mask: Tensor, dim: int) -> Tensor:
    """``mask.sum(dim)`` of a bool tensor without a wider copy of it (int32 counts).

    On the CPU, summed as bytes in blocks of 255 along ``dim`` (a byte holds a block's count: no cast, no copy), then
    the few block counts are added in int32; a cast before the sum would copy the whole mask into a fresh buffer.
    Elsewhere one ``sum`` kernel (it widens each value as it reads it).

    Example:
        >>> m = torch.rand(600, 3) < 0.5
        >>> bool((count_true(m, 0) == m.sum(0)).all()), count_true(m, 0).dtype
        (True, torch.int32)
    """
    if not by_lookup(mask):  # off the CPU one reduction kernel that widens as it reads: fewer launches
        return mask.sum(dim, dtype=torch.int32)
    n = mask.shape[dim]
    u8 = mask.view(torch.uint8)
    if n < 2**8:
        return u8.sum(dim, dtype=torch.uint8).to(torch.int32)
    full = n - n % 255
    head = u8.narrow(dim, 0, full)
    shape = [*head.shape[:dim], full // 255, 255, *head.shape[dim + 1 :]]
    blocks = head.reshape(shape).sum(dim + 1, dtype=torch.uint8).sum(dim, dtype=torch.int32)
    return blocks if full == n else blocks + u8.narrow(dim, full, n - full).sum(dim, dtype=torch.uint8)


class Workspace:
    """Scratch buffers kept from one update to the next, one per name, grown when a larger one is asked for.

    On the CPU a fresh multi-megabyte temporary costs page faults on every update (the allocator hands large blocks
    back to the system); ops that write into a kept buffer (``out=``) do not. Views of the buffers are valid until the
    next :meth:`take` of the same name.

    Example:
        >>> ws = Workspace(torch.device("cpu"))
        >>> a = ws.take("x", (2, 3), torch.float32)
        >>> b = ws.take("x", (3, 2), torch.float32)
        >>> a.data_ptr() == b.data_ptr(), ws.nbytes
        (True, 24)
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A ``shape`` view of the buffer ``name`` (its contents are whatever the last user left)."""
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < size:
            buffer = self._buffers[name] = torch.empty(size, dtype=dtype, device=self.device)
        return buffer[:size].view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def row_index(pos: Tensor, seen: int, per_sample: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """Sample index of rows ``pos`` (in the stage's loader order; under DDP the sampler's) and their element.

    Both float64 (the worst-rows tables store them so); one sample a row (``per_sample == 1``) takes no division.

    Example:
        >>> [t.tolist() for t in row_index(torch.tensor([0, 5]), 10, 4, 1, 2)]  # an example: values read on the host
        [[21.0, 23.0], [0.0, 1.0]]
    """
    if per_sample == 1:
        return pos.mul(world).add_(seen * world + rank).double(), torch.zeros_like(pos, dtype=torch.float64)
    lead = torch.div(pos, per_sample, rounding_mode="floor")
    return lead.mul(world).add_(seen * world + rank).double(), torch.sub(pos, lead, alpha=per_sample).double()


__all__ = [
    "ARGMAX_CHUNK",
    "SCRATCH",
    "chunk_maxima",
    "count_above",
    "count_true",
    "descending_weights",
    "first_argmax",
    "first_hit",
    "fits_scratch",
    "in_top_k",
    "in_top_k_chunks",
    "max_in_chunks",
    "row_index",
    "row_nll",
    "Workspace",
]
