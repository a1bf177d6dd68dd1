"""The TensorBoard custom-scalars layout: charts a person wants side by side, written once at fit start."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Charts every run gets (title -> tag regexes). Callbacks add their own through ``layout_entries()``.
BASE_LAYOUT: dict[str, list[str]] = {
    "Loss (train vs val)": [r"train/loss$", r"train/loss_ema$", r"val/loss$"],
    "Loss terms": [r"train/loss/.*", r"val/loss/.*"],
    "Gradient norm: pre-clip, post-clip, clip value": [
        r"grad/norm_total(_opt\d+)?$",  # with several optimizers each has its own series (`_opt<i>`)
        r"grad/norm_total_clipped(_opt\d+)?$",
        r"grad/clip_val$",
    ],
    "Clip rate": [r"grad/clip_rate(_opt\d+)?$"],
    "Learning rate with ReduceLROnPlateau counters": [
        r"lr/.*",
        r"plateau/num_bad_epochs$",
        r"plateau/cooldown$",
        r"plateau/epochs_to_reduction$",
        r"plateau/reductions$",
    ],
    "ReduceLROnPlateau best": [r"plateau/best$"],
}


def build_layout(entries: Mapping[str, Sequence[str]], category: str = "lossdiag") -> dict[str, Any]:
    """Turn ``title -> tag regexes`` into the nested mapping ``SummaryWriter.add_custom_scalars`` takes.

    Example:
        >>> build_layout({"Loss": ["train/loss$", "val/loss$"]})
        {'lossdiag': {'Loss': ['Multiline', ['train/loss$', 'val/loss$']]}}
    """
    charts = {title: ["Multiline", list(tags)] for title, tags in entries.items() if tags}
    return {category: charts}


def merge_entries(*parts: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Merge several ``title -> regexes`` mappings; a title seen twice gets the union of its regexes, in order.

    Example:
        >>> merge_entries({"A": ["x"]}, {"A": ["y", "x"], "B": ["z"]})
        {'A': ['x', 'y'], 'B': ['z']}
    """
    merged: dict[str, list[str]] = {}
    for part in parts:
        for title, tags in part.items():
            bucket = merged.setdefault(title, [])
            bucket.extend(t for t in tags if t not in bucket)
    return merged


def write_layout(writers: Sequence[Any], entries: Mapping[str, Sequence[str]]) -> None:
    """Write the layout to every ``SummaryWriter`` (call once per fit, on global rank 0)."""
    layout = build_layout(entries)
    for writer in writers:
        writer.add_custom_scalars(layout)
