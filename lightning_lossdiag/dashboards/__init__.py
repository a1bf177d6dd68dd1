"""TensorBoard writing: histograms, figures, PR curves, text and the custom-scalars layout."""
