"""vim_digits: a small Vision Mamba trained on scikit-learn's handwritten digits (issue 3).

The same VisionMamba code as vim_t/s/b with a small config: the 8 x 8 digits upsampled to
32 x 32 grey images, patch 4 -> 64 patch tokens (+ the middle class token), 10 classes. Its
weights ship in the package (weights/vim_digits.pt) so merging accuracy can be measured on a
fresh machine; ``mame-deploy train vim_digits`` reproduces them (mame_deploy/train.py).
"""

from __future__ import annotations

from pathlib import Path

from .registry import ModelSpec, register
from .vim import VimConfig, VisionMamba

WEIGHTS = Path(__file__).resolve().parent / "weights" / "vim_digits.pt"

DIGITS_CONFIG = VimConfig(
    embed_dim=64, depth=8, img_size=32, patch_size=4, in_chans=1, num_classes=10, d_state=8,
)

register(ModelSpec(
    "vim_digits", VisionMamba, DIGITS_CONFIG,
    weights="bundled (sklearn digits; mame-deploy train vim_digits)",
    bundled_checkpoint=WEIGHTS,
    info={"preprocess": "digits", "data": "sklearn digits: test = index % 4 == 3, val = index % 8 == 1"},
))
