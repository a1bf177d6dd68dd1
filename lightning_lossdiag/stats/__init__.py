"""Device-side streaming statistics: pure tensor code (no Lightning), fixed-size state, mergeable across ranks.

Each statistic is a pure functional core (``_update``/``_reduce`` functions returning new state tensors) wrapped by a
thin class holding the state tensors on one device. Every class has ``update`` (no host read), ``merge(other)``,
``sync(gather)`` (merge across DDP ranks with e.g. ``pl_module.all_gather``), ``reset``, ``state_dict`` /
``load_state_dict``, ``to(device)`` and ``state_bytes()``. Counts are int64 (or float64, exact to 2**53).

* :class:`FixedHistogram` and :func:`histogram_raw_args`: histograms for ``SummaryWriter.add_histogram_raw``.
* :class:`RunningMoments`: count, mean, variance (Chan merge), min, max.
* :class:`BoundedSample`: a uniform sample of at most ``k`` rows (bottom-k of random keys).
* :class:`TopKWorst`: the ``k`` rows with the largest scores.
* :class:`BinnedErrors` and :func:`quantile_edges_from_sample`: errors grouped by target bins.
* :class:`ClassCounts`: a classification stage's device counts (per-class counts, binned curves, confusion or
  :class:`ConfusedPairs`), read by :func:`class_metrics`.

Example:
    >>> import torch
    >>> h = FixedHistogram(0.0, 1.0, bins=2)
    >>> h.update(torch.tensor([0.1, 0.9, 0.95]))
    >>> h.sync(single_process_gather)
    >>> h.counts.tolist()
    [1, 2]
"""

from lightning_lossdiag.stats.binned import BinnedErrors, quantile_edges_from_sample
from lightning_lossdiag.stats.class_metrics import class_metrics
from lightning_lossdiag.stats.classification import ClassCounts
from lightning_lossdiag.stats.distributed import GatherFn, single_process_gather
from lightning_lossdiag.stats.histogram import FixedHistogram, histogram_edges, histogram_raw_args
from lightning_lossdiag.stats.moments import RunningMoments
from lightning_lossdiag.stats.pairs import ConfusedPairs
from lightning_lossdiag.stats.sample import BoundedSample
from lightning_lossdiag.stats.topk import TopKWorst

__all__ = [
    "BinnedErrors",
    "BoundedSample",
    "ClassCounts",
    "ConfusedPairs",
    "FixedHistogram",
    "GatherFn",
    "RunningMoments",
    "TopKWorst",
    "class_metrics",
    "histogram_edges",
    "histogram_raw_args",
    "quantile_edges_from_sample",
    "single_process_gather",
]
