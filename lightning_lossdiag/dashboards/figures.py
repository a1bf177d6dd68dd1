"""Matplotlib figures rendered to ``HWC`` uint8 arrays for ``SummaryWriter.add_image(..., dataformats="HWC")``.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no global state, no display), so
they are safe in training processes and DDP workers. Inputs are host numpy arrays taken at epoch end.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render ``fig`` and return its pixels as an ``(H, W, 3)`` uint8 array.

    Example:
        >>> figure_to_array(Figure(figsize=(2, 1), dpi=50)).shape
        (50, 100, 3)
    """
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def normalize_confusion(counts: np.ndarray) -> np.ndarray:
    """Each row (true class) divided by its total; rows with no samples stay 0.

    Example:
        >>> normalize_confusion(np.array([[3, 1], [0, 0]])).tolist()
        [[0.75, 0.25], [0.0, 0.0]]
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"`counts` must be a square (C, C) matrix, got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def confusion_matrix_figure(
    counts: np.ndarray, class_names: Sequence[str] | None = None, *, title: str = "Confusion matrix"
) -> np.ndarray:
    """A confusion matrix normalised by true class (rows), with the counts of each true class on the y labels.

    Args:
        counts: ``(C, C)`` counts, ``counts[true, predicted]``.
        class_names: labels of the classes (default ``0 .. C-1``).
        title: the figure title.

    Returns:
        ``(H, W, 3)`` uint8 pixels.

    Example:
        >>> confusion_matrix_figure(np.array([[5, 1], [2, 8]])).dtype
        dtype('uint8')
    """
    norm = normalize_confusion(counts)
    num = norm.shape[0]
    names = [str(c) for c in (class_names if class_names is not None else range(num))]
    if len(names) != num:
        raise ValueError(f"`class_names` must have {num} entries (one per class), got {len(names)}")
    totals = np.asarray(counts).sum(axis=1)
    size = min(12.0, 2.5 + 0.45 * num)
    fig = Figure(figsize=(size + 1.0, size), dpi=80)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(num), names, rotation=90 if num > 10 else 0)
    ax.set_yticks(range(num), [f"{n} (n={int(t)})" for n, t in zip(names, totals, strict=True)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if num <= 20:
        for i in range(num):
            for j in range(num):
                ax.text(
                    j,
                    i,
                    f"{norm[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    return figure_to_array(fig)


def pred_vs_true_figure(
    target: np.ndarray,
    preds: np.ndarray,
    bin_edges: np.ndarray,
    bin_mean_abs: np.ndarray,
    bin_count: np.ndarray,
    *,
    title: str = "Predicted vs true",
) -> np.ndarray:
    """Scatter of predictions against targets with the ``y = x`` line, beside the mean absolute error per target bin.

    Bars span their target bin and are labelled with the number of samples in it.

    Args:
        target: ``(S,)`` targets of the bounded sample.
        preds: ``(S,)`` predictions of the same rows.
        bin_edges: ``(B + 1,)`` ascending edges of the target bins.
        bin_mean_abs: ``(B,)`` mean absolute error per bin (over all samples, not only the plotted ones).
        bin_count: ``(B,)`` samples per bin.
        title: the figure title.

    Returns:
        ``(H, W, 3)`` uint8 pixels.

    Example:
        >>> y = np.linspace(0, 1, 50); edges = np.array([0.0, 0.5, 1.0])
        >>> pred_vs_true_figure(y, y + 0.1, edges, np.array([0.1, 0.1]), np.array([25, 25])).shape[2]
        3
    """
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    preds = np.asarray(preds, dtype=np.float64).reshape(-1)
    if target.shape != preds.shape:
        raise ValueError(f"`target` and `preds` must have the same length, got {target.shape} and {preds.shape}")
    edges = np.asarray(bin_edges, dtype=np.float64).reshape(-1)
    mean_abs = np.asarray(bin_mean_abs, dtype=np.float64).reshape(-1)
    count = np.asarray(bin_count, dtype=np.float64).reshape(-1)
    if not (edges.size == mean_abs.size + 1 == count.size + 1):
        raise ValueError(
            f"`bin_edges` must have one more entry than `bin_mean_abs` and `bin_count`, got {edges.size}, "
            f"{mean_abs.size} and {count.size}"
        )
    fig = Figure(figsize=(10, 4.5), dpi=80)
    ax = fig.add_subplot(1, 2, 1)
    ax.scatter(target, preds, s=6, alpha=0.4, linewidths=0)
    finite = np.concatenate([target, preds])
    finite = finite[np.isfinite(finite)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    ax.plot([low, high], [low, high], color="black", linewidth=1, label="y = x")
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(f"{title} (n={target.size} sampled)")
    ax.legend(loc="upper left")
    ax2 = fig.add_subplot(1, 2, 2)
    # Target bins are quantiles of the targets (about equally full), so they are drawn as equal-width categories
    # labelled by their range; the outer bins are open-ended.
    safe = np.where(np.isfinite(mean_abs), mean_abs, 0.0)
    positions = np.arange(safe.size)
    bars = ax2.bar(positions, safe, width=0.8, edgecolor="black", alpha=0.7)
    for bar, n in zip(bars, count, strict=True):
        ax2.annotate(
            f"n={int(n)}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7
        )
    labels = [f"{edges[i]:.3g}..{edges[i + 1]:.3g}" for i in range(safe.size)]
    if safe.size > 1:
        labels[0], labels[-1] = f"< {edges[1]:.3g}", f">= {edges[-2]:.3g}"
    ax2.set_xticks(positions, labels, rotation=45, ha="right", fontsize=7)
    ax2.set_xlabel("true value (bin)")
    ax2.set_ylabel("mean |error|")
    ax2.set_title("Absolute error by target bin")
    fig.tight_layout()
    return figure_to_array(fig)


__all__ = ["confusion_matrix_figure", "figure_to_array", "normalize_confusion", "pred_vs_true_figure"]


def reliability_figure(weight: np.ndarray, confidence: np.ndarray, hits: np.ndarray, *, title: str = "") -> np.ndarray:
    """Reliability diagram: the accuracy of each confidence bin against its mean confidence, with the diagonal.

    Args:
        weight: ``(B,)`` samples per bin (the last bin holds confidence 1.0 exactly).
        confidence: ``(B,)`` sums of the confidences per bin.
        hits: ``(B,)`` sums of the hits (1 when the prediction was right) per bin.
        title: the figure title (the ECE is added).

    Returns:
        ``(H, W, 3)`` uint8 pixels.

    Example:
        >>> reliability_figure(np.array([4.0, 0.0, 6.0]), np.array([1.0, 0.0, 5.4]), np.array([2.0, 0.0, 5.0])).ndim
        3
    """
    w = np.asarray(weight, dtype=np.float64)
    filled = w > 0
    conf = np.divide(confidence, w, out=np.zeros_like(w), where=filled)
    acc = np.divide(hits, w, out=np.zeros_like(w), where=filled)
    ece = float((np.abs(acc - conf) * w).sum() / max(w.sum(), 1e-300))
    fig = Figure(figsize=(5.5, 5.0), dpi=80)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    width = 1.0 / max(len(w) - 1, 1)
    ax.bar(conf[filled], acc[filled], width=width * 0.9, alpha=0.6, color="tab:blue", label="accuracy per bin")
    ax.scatter(conf[filled], acc[filled], s=12 + 60 * w[filled] / max(w.max(), 1e-300), color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence of the bin")
    ax.set_ylabel("accuracy of the bin")
    ax.set_title(f"{title + ': ' if title else ''}ECE {ece:.3f} over {int(w.sum())} samples")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return figure_to_array(fig)
