"""vim_digits: a small Vision Mamba trained on scikit-learn's handwritten digits (issue 3)."""
