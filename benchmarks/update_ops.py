"""Torch ops dispatched by one update of the class engine, by part: where the fixed cost of a hand-over lies.

One ``ClassCounts.update`` runs on a warm state under ``torch.profiler``; every top-level ``aten::`` op is charged to
the innermost part of the update that called it (each part is wrapped in a ``record_function``). On the CPU of a
fit each op costs several microseconds whatever its size, and on a GPU each is host time spent launching a kernel,
so this count, more than the number of values, is what a hand-over costs on small and medium outputs.

    python benchmarks/update_ops.py                      # cls1000, tag1000 and seg21 of benchmarks/scale.py
    python benchmarks/update_ops.py --device cuda        # the same on a GPU (ops, not kernels)
    python benchmarks/update_ops.py --path device        # the GPU's code path, counted on the CPU (no GPU needed)
    python benchmarks/update_ops.py --device cuda --time --lm   # and each update's host time, with the H200 LM case
    python benchmarks/update_ops.py --hold 16            # as the engine counts: 16 held updates, one settle among them
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import time
from typing import Any

import torch
from torch.profiler import profile, record_function

from lightning_lossdiag.stats import classification, curves, label_counts, multiclass_counts, pairs, topk

PARTS = {
    classification.ClassCounts: ("_add_curves", "_add_classwise", "_labels", "_add_probs", "_offer_worst"),
    pairs.ConfusedPairs: ("update",),
    topk.TopKWorst: ("update",),
}
# module functions, wrapped where their callers look them up (the module that imports them)
FUNCTIONS = {
    classification: (
        "update_multiclass",
        "update_binary",
        "update_multilabel",
        "settle_multiclass",
        "settle_multilabel",
    ),
    multiclass_counts: ("row_scores", "add_rows", "add_sampled", "calibration_bins", "calibration_bin", "row_nll"),
    label_counts: ("label_piece", "add_labels_sampled", "calibration_bins", "label_values"),
}


def _wrap(owner: Any, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)

    setattr(owner, name, wrapped)


def instrument() -> None:
    """Wrap every part of an update in a ``record_function`` named after it."""
    for owner, names in PARTS.items():
        for name in names:
            if hasattr(owner, name):
                _wrap(owner, name, f"{owner.__name__}.{name}")
    for module, names in FUNCTIONS.items():
        for name in names:
            if hasattr(module, name):
                _wrap(module, name, name)


def cases(device: torch.device, views: bool, lm: bool = False, hold: int = 1) -> dict[str, tuple[Any, Any, Any]]:
    """The workloads of ``benchmarks/scale.py`` (and, with ``lm``, the H200 LM's bf16 ``(16, 512, 8192)`` logits).

    ``hold``: the counts hold that many updates before adding them (``ClassCounts(hold=...)``, as the engine does).
    """
    g = torch.Generator().manual_seed(0)
    kw: dict[str, Any] = {"device": device, "views": views, "hold": hold}
    extra = {}
    if lm:
        target = torch.randint(0, 8192, (16, 512), generator=g)
        target[:, ::20] = -100
        extra["lm8192 (16, 512, 8192) bf16"] = (
            classification.ClassCounts("multiclass", "logits", 8192, class_dim=-1, ignore_index=-100, **kw),
            torch.randn(16, 512, 8192, generator=g).bfloat16(),
            target,
        )
    return extra | {
        "cls1000 (256, 1000)": (
            classification.ClassCounts("multiclass", "logits", 1000, **kw),
            torch.randn(256, 1000, generator=g),
            torch.randint(0, 1000, (256,), generator=g),
        ),
        "tag1000 (256, 1000)": (
            classification.ClassCounts("multilabel", "logits", 1000, **kw),
            torch.randn(256, 1000, generator=g),
            (torch.rand(256, 1000, generator=g) < 0.02).float(),
        ),
        "seg21 (8, 21, 64, 64)": (
            classification.ClassCounts("multiclass", "logits", 21, ignore_index=255, **kw),
            torch.randn(8, 21, 64, 64, generator=g),
            torch.randint(0, 21, (8, 64, 64), generator=g),
        ),
    }


def count(counts: Any, preds: torch.Tensor, target: torch.Tensor, updates: int = 1) -> collections.Counter[str]:
    """Top-level ``aten::`` ops of ``updates`` updates (after warm-up updates), keyed by the innermost part."""
    for _ in range(max(3, 2 * updates)):
        counts.update(preds, target)
    with profile() as prof:
        for _ in range(updates):
            counts.update(preds, target)
    charged: collections.Counter[str] = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if not event.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        label = "update itself"
        while parent is not None:
            if not parent.name.startswith("aten::"):
                label = parent.name
                break
            parent = parent.cpu_parent
        charged[label] += 1
    return charged


def timed(counts: Any, preds: torch.Tensor, target: torch.Tensor, n: int = 20, updates: int = 1) -> tuple[float, float]:
    """Median ms of one update: host time (until it returns) and, on a GPU, until its kernels are done too.

    ``updates > 1``: each timing covers that many updates (one settle of held updates among them), divided by it.
    """
    cuda = preds.is_cuda
    host, done = [], []
    for i in range(n + 3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(updates):
            counts.update(preds, target)
        t1 = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= 3:  # warm-up updates left out
            host.append((t1 - t0) / updates)
            done.append((t2 - t0) / updates)
    return 1e3 * statistics.median(host), 1e3 * statistics.median(done)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--views",
        default="both",
        choices=["on", "off", "both"],
        help="with the error views' statistics (a slot ErrorDistributionMonitor reads), without (MetricCurves only)",
    )
    parser.add_argument(
        "--path",
        default="native",
        choices=["native", "device"],
        help="device: the code path taken off the CPU (bins by bucketize, argmax by max, counts by one sum, row-loss "
        "pieces of 16M scores), on any device",
    )
    parser.add_argument(
        "--time", action="store_true", help="also time one update (median of 20): host ms, and ms until done on a GPU"
    )
    parser.add_argument(
        "--lm", action="store_true", help="add the H200 LM's bf16 (16, 512, 8192) logits (a GPU case: ~0.5 GB)"
    )
    parser.add_argument(
        "--hold",
        type=int,
        default=1,
        help="updates held before they are added (the engine holds 16): ops and times per update over that many",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.path == "device":
        curves.LOOKUP_DEVICES = frozenset()  # the one switch between the CPU's paths and a GPU's
    instrument()
    path = "" if args.path == "native" else ", the off-CPU path"
    print(f"torch {torch.__version__}, device {device}{path}; top-level aten ops of one ClassCounts.update")
    for views in {"on": [True], "off": [False], "both": [True, False]}[args.views]:
        for name, (counts, preds, target) in cases(device, views, args.lm, args.hold).items():
            preds, target = preds.to(device), target.to(device)
            charged = count(counts, preds, target, args.hold)
            parts = ", ".join(f"{label} {n}" for label, n in charged.most_common())
            total = sum(charged.values())
            held = f" over {args.hold} held updates, {total / args.hold:.1f} per update" if args.hold > 1 else ""
            print(f"{name}, views {'on' if views else 'off'}: {total} ops{held} ({parts})")
            if args.time:
                host, done = timed(counts, preds, target, updates=args.hold)
                until = f", {done:.3f} ms until done" if preds.is_cuda else ""
                print(f"    one update: {host:.3f} ms on the host{until} (parts wrapped for the count)")


if __name__ == "__main__":
    main()
