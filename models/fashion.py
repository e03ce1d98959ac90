"""vim_fashion: a Vision Mamba at Vision Mamba's own token count, trained on Fashion-MNIST (issue 13).

The VisionMamba code of vim_t/s/b (bimamba v2, middle class token, RMSNorm) with a small
config: 28 x 28 grey images, patch 2 -> 14 x 14 = 196 patch tokens + the class token, as
vim_t/s/b at 224 px / patch 16; 128 wide, 8 blocks, d_state 8 (sized so that CI's 2 CPU cores
evaluate 1,000 images in onnxruntime in well under a minute). Its weights ship in the package
(weights/vim_fashion.pt); ``mame-deploy train vim_fashion --device cuda`` reproduces them
(recipe in mame_deploy/train.py, log and timing in docs/fashion.md). Data: Debian's
dataset-fashion-mnist package (mame_deploy/data.py).
"""

from __future__ import annotations

from pathlib import Path

from .registry import ModelSpec, register
from .vim import VimConfig, VisionMamba

WEIGHTS = Path(__file__).resolve().parent / "weights" / "vim_fashion.pt"

FASHION_CONFIG = VimConfig(
    embed_dim=128, depth=8, img_size=28, patch_size=2, in_chans=1, num_classes=10, d_state=8,
)

register(ModelSpec(
    "vim_fashion", VisionMamba, FASHION_CONFIG,
    weights="bundled (Fashion-MNIST; mame-deploy train vim_fashion)",
    bundled_checkpoint=WEIGHTS,
    info={"preprocess": "fashion",
          "data": "Fashion-MNIST (dataset-fashion-mnist): test = t10k, val = train index % 12 == 11"},
))
