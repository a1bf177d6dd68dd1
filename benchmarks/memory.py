"""Memory of a validation epoch's error statistics: streaming device state vs keeping every prediction.

For each size, predictions and targets are streamed in batches of 4096 (synthetic regression data made here)
through the statistics ``ErrorDistributionMonitor`` uses in a validation epoch -- ``FixedHistogram`` (64 bins) of
the residual, ``RunningMoments``, ``BoundedSample`` (k=2048, 3 columns), ``TopKWorst`` (k=20) and ``BinnedErrors``
(10 bins) -- and, beside it, through the naive approach that appends every batch to a list and concatenates at the
end. Each measurement runs in a fresh subprocess so ``ru_maxrss`` (peak resident memory) is its own.

Columns: bytes held by the tensors at the end of the epoch (streaming: the state tensors; naive: the kept batches),
peak tensor bytes (naive: the kept batches plus their concatenation; streaming: the state plus one batch's inputs),
peak Python allocations (``tracemalloc``; torch's tensor storage is not traced), growth of the process's max RSS
over a warmed-up baseline, the time to stream the epoch, and the time of one "epoch-end write": the host-side
histogram arguments (``histogram_raw_args`` / ``numpy.histogram``) plus a matplotlib scatter of 2048 sampled
``(target, prediction)`` pairs rendered to a PNG in memory.

    python benchmarks/memory.py                   # sizes 1e5 1e6 1e7; CUDA when present, else CPU
    python benchmarks/memory.py --sizes 1e5 3e6 --device cpu

On CUDA the batches and the state live on the GPU, and a column adds the peak device memory the epoch allocated
(``torch.cuda.max_memory_allocated`` over the baseline).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import time
import tracemalloc
from typing import Any

import torch

BATCH = 4096
SAMPLE_K = 2048
WORST_K = 20
BINS = 64
TARGET_BINS = 10


def batches(n: int, batch: int = BATCH, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    done = 0
    while done < n:
        m = min(batch, n - done)
        target = torch.randn(m, generator=gen)
        preds = target + 0.3 * torch.randn(m, generator=gen) + 0.05 * target**2
        yield done, preds.to(device), target.to(device)
        done += m


def scatter_png(target, preds) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.scatter(target, preds, s=2, alpha=0.5)
    ax.set_xlabel("target")
    ax.set_ylabel("prediction")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.tell()


def make_stats(device: str = "cpu") -> dict[str, Any]:
    from lightning_lossdiag.stats import BinnedErrors, BoundedSample, FixedHistogram, RunningMoments, TopKWorst

    return {
        "residual": FixedHistogram(-3.0, 3.0, bins=BINS, device=device),
        "moments": RunningMoments(device),
        "sample": BoundedSample(SAMPLE_K, 3, device=device),
        "worst": TopKWorst(WORST_K, 3, device),
        "binned": BinnedErrors(torch.linspace(-3.0, 3.0, TARGET_BINS + 1), device=device),
    }


def stream_update(stats: dict[str, Any], offset: int, preds: torch.Tensor, target: torch.Tensor) -> None:
    err = preds - target
    index = torch.arange(offset, offset + len(preds), dtype=torch.float32, device=preds.device)
    rows = torch.stack([index, target, preds], dim=1)
    stats["residual"].update(err)
    stats["moments"].update(err)
    stats["sample"].update(rows)
    stats["worst"].update(err.abs(), rows)
    stats["binned"].update(target, err.abs())


def stream_write(stats: dict[str, Any]) -> None:
    from lightning_lossdiag.stats import histogram_raw_args

    histogram_raw_args(stats["residual"])  # epoch end: one host transfer
    rows = stats["sample"].rows.cpu().numpy()  # epoch end: the bounded sample to the host
    stats["worst"].rows.cpu().numpy()
    stats["binned"].mean_abs().cpu().numpy()
    scatter_png(rows[:, 1], rows[:, 2])


def naive_write(preds: torch.Tensor, target: torch.Tensor) -> None:
    import numpy as np

    preds, target = preds.cpu(), target.cpu()  # epoch end: everything kept goes to the host
    err = (preds - target).numpy()
    np.histogram(err, bins=BINS, range=(-3.0, 3.0))
    err.mean(), err.var(), err.min(), err.max()
    np.argsort(-np.abs(err))[:WORST_K]
    pick = np.random.default_rng(0).choice(len(err), size=min(SAMPLE_K, len(err)), replace=False)
    scatter_png(target.numpy()[pick], preds.numpy()[pick])


def worker(mode: str, n: int, device: str = "cpu") -> dict[str, Any]:
    torch.set_num_threads(1)
    cuda = device.startswith("cuda")
    # warm-up: first calls of every kernel and of matplotlib are not part of the measurement
    warm = make_stats(device)
    for offset, preds, target in batches(2 * BATCH, device=device):
        stream_update(warm, offset, preds, target)
    stream_write(warm)
    naive_write(preds, target)
    del warm
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_cuda = torch.cuda.memory_allocated() if cuda else 0
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    if mode == "streaming":
        stats = make_stats(device)
        for offset, preds, target in batches(n, device=device):
            stream_update(stats, offset, preds, target)
        held = sum(s.state_bytes() for s in stats.values())
        peak_tensor = held + 2 * BATCH * 4 + BATCH * 3 * 4  # plus one batch's preds, target and rows
        stream_s = time.perf_counter() - start
        start = time.perf_counter()
        stream_write(stats)
    else:
        kept_preds, kept_target = [], []
        for _, preds, target in batches(n, device=device):
            kept_preds.append(preds.clone())
            kept_target.append(target.clone())
        held = sum(t.numel() * t.element_size() for t in kept_preds + kept_target)
        peak_tensor = 2 * held  # the kept batches and their concatenation
        stream_s = time.perf_counter() - start
        start = time.perf_counter()
        naive_write(torch.cat(kept_preds), torch.cat(kept_target))
    if cuda:
        torch.cuda.synchronize()
    write_s = time.perf_counter() - start
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_delta = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024  # Linux: KiB
    return {
        "mode": mode,
        "n": n,
        "held": held,
        "peak_tensor": peak_tensor,
        "py_peak": py_peak,
        "rss_delta": rss_delta,
        "stream_s": stream_s,
        "write_s": write_s,
        "cuda_peak": (torch.cuda.max_memory_allocated() - base_cuda) if cuda else None,
    }


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7], help="predictions per epoch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.device)))
        return
    rows = []
    for size in args.sizes:
        for mode in ("streaming", "naive"):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", mode, str(int(size)), "--device", args.device],
                check=True,
                capture_output=True,
                text=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"done: {mode} n={int(size):,}", file=sys.stderr)
    print(
        f"\nBatches of {BATCH}; stats: FixedHistogram({BINS} bins), RunningMoments, "
        f"BoundedSample(k={SAMPLE_K}, 3 cols), TopKWorst(k={WORST_K}), BinnedErrors({TARGET_BINS} bins). "
        f"torch {torch.__version__}, {args.device}, 1 CPU thread; times include making the synthetic batches.\n"
    )
    cuda = args.device == "cuda"
    print(
        "| predictions | approach | tensors held | peak tensors | peak Python (tracemalloc) | max RSS growth "
        "| stream time | epoch-end write |" + (" peak CUDA allocated |" if cuda else "")
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if cuda else ""))
    for r in rows:
        print(
            f"| {r['n']:,} | {r['mode']} | {human(r['held'])} | {human(r['peak_tensor'])} | {human(r['py_peak'])} "
            f"| {human(r['rss_delta'])} | {r['stream_s']:.2f} s | {r['write_s'] * 1000:.0f} ms |"
            + (f" {human(r['cuda_peak'])} |" if cuda else "")
        )


if __name__ == "__main__":
    main()
