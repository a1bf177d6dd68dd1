"""Figures render to HWC uint8 arrays; the confusion normalisation and the markdown table are exact."""

import numpy as np
import pytest

from lightning_lossdiag.dashboards.figures import (
    confusion_matrix_figure,
    normalize_confusion,
    pred_vs_true_figure,
)
from lightning_lossdiag.dashboards.tables import markdown_table, worst_samples_table


def test_pred_vs_true_figure_is_an_rgb_image():
    rng = np.random.default_rng(0)
    y = rng.normal(size=300)
    edges = np.quantile(y, np.linspace(0, 1, 9))
    img = pred_vs_true_figure(y, y + rng.normal(size=300) * 0.1, edges, np.full(8, 0.1), np.full(8, 37))
    assert img.dtype == np.uint8
    assert img.ndim == 3
    assert img.shape[2] == 3
    assert img.shape[0] > 100
    assert img.shape[1] > 2 * img.shape[0] * 0.9  # two panels side by side
    assert img.std() > 0  # something was drawn


def test_pred_vs_true_figure_rejects_mismatched_bins():
    with pytest.raises(ValueError, match="`bin_edges`"):
        pred_vs_true_figure(np.zeros(3), np.zeros(3), np.array([0.0, 1.0]), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="same length"):
        pred_vs_true_figure(np.zeros(3), np.zeros(4), np.array([0.0, 1.0]), np.zeros(1), np.zeros(1))


def test_confusion_matrix_normalised_by_true_class():
    counts = np.array([[8, 2, 0], [1, 1, 2], [0, 0, 0]])
    norm = normalize_confusion(counts)
    np.testing.assert_allclose(norm[0], [0.8, 0.2, 0.0])
    np.testing.assert_allclose(norm[1], [0.25, 0.25, 0.5])
    np.testing.assert_allclose(norm[2], [0.0, 0.0, 0.0])  # a class with no samples stays 0, not nan
    img = confusion_matrix_figure(counts, ["a", "b", "c"])
    assert img.dtype == np.uint8
    assert img.shape[2] == 3
    with pytest.raises(ValueError, match="`class_names`"):
        confusion_matrix_figure(counts, ["a"])
    with pytest.raises(ValueError, match="square"):
        normalize_confusion(np.zeros((2, 3)))


def test_worst_table_markdown():
    text = worst_samples_table([12, 3], [1.5, -2.0], [9.5, 0.25], [8.0, 2.25], element=[0, 4])
    lines = text.splitlines()
    assert lines[0] == "| rank | index | element | target | prediction | loss |"
    assert lines[2] == "| 1 | 12 | 0 | 1.5 | 9.5 | 8 |"
    assert lines[3] == "| 2 | 3 | 4 | -2 | 0.25 | 2.25 |"
    assert markdown_table(["x"], [["a|b"]]).splitlines()[2] == "| a\\|b |"
    with pytest.raises(ValueError, match="same length"):
        worst_samples_table([1], [1.0, 2.0], [1.0], [1.0])
