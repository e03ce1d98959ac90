"""The training recipe of the bundled vim_digits model (scikit-learn digits, CPU, minutes).

Deterministic for a given seed and thread count: one generator drives initialisation order,
shuffling and augmentation. Gradients flow through the reference selective scan.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mame_deploy.data import DIGITS_MEAN, DIGITS_STD, digits_dataset
from mame_deploy.errors import UserError
from mame_deploy.evaluate import evaluate

TRAINABLE = ("vim_digits",)
BACKGROUND = (0.0 - DIGITS_MEAN) / DIGITS_STD  # a blank pixel after normalisation


@dataclass(frozen=True)
class Recipe:
    epochs: int = 12
    batch_size: int = 48
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    shift: int = 3            # random translation, pixels of the 32 x 32 input
    seed: int = 0


@dataclass
class EpochLog:
    epoch: int
    loss: float
    val_accuracy: float


def _shift(images: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background level."""
    if max_shift == 0:
        return images
    B, _, H, W = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=BACKGROUND)
    offsets = torch.randint(0, 2 * max_shift + 1, (B, 2), generator=gen)
    return torch.stack([padded[b, :, y:y + H, x:x + W] for b, (y, x) in enumerate(offsets.tolist())])


def train_digits(
    recipe: Recipe = Recipe(),
    on_step: Optional[Callable[[int, int, float], None]] = None,
    on_epoch: Optional[Callable[[EpochLog], None]] = None,
    limit: Optional[int] = None,
    **overrides,
):
    """Train vim_digits from its seeded initialisation on the digits train subset; returns the
    model (eval mode) and one ``EpochLog`` per epoch (accuracy on the val subset).
    ``limit`` (first N training images) and config ``overrides`` exist for quick checks."""
    from mame_deploy.models import get_spec, init_weights

    spec = get_spec("vim_digits")
    config = dataclasses.replace(spec.config, **overrides)
    torch.manual_seed(recipe.seed)
    model = init_weights(spec.build(config), recipe.seed)
    train = digits_dataset("train", config.img_size)
    val = digits_dataset("val", config.img_size)
    images, labels = train.images[:limit], train.labels[:limit]
    gen = torch.Generator().manual_seed(recipe.seed)

    steps_per_epoch = math.ceil(len(labels) / recipe.batch_size)
    total, warmup = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch
    # No weight decay on norms, biases, A/D, embeddings (as the released Vim/Mamba recipes).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith(("A_log", "A_b_log"))
             and n not in ("pos_embed", "cls_token")]
    rest = [p for p in model.parameters() if all(p is not q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr)
    lr_at = lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / total)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    history, step = [], 0
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=gen)
        running = 0.0
        for i in range(0, len(labels), recipe.batch_size):
            idx = order[i:i + recipe.batch_size]
            x = _shift(images[idx], recipe.shift, gen)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
            step += 1
            if on_step is not None:
                on_step(step, total, loss.item())
        correct, total_val = evaluate(model, val, batch_size=256)
        log = EpochLog(epoch + 1, running / len(labels), correct / total_val)
        history.append(log)
        if on_epoch is not None:
            on_epoch(log)
    return model.eval(), history


def save_weights(model, path: str | Path, recipe: Recipe, history: list[EpochLog], force: bool = False) -> Path:
    """The checkpoint (``{"model": state_dict, "recipe": ..., "history": ...}``), written atomically."""
    from mame_deploy import artifacts

    path = Path(path)
    artifacts.check_writable([path], force)
    buffer = io.BytesIO()
    torch.save({
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "recipe": dataclasses.asdict(recipe),
        "history": [dataclasses.asdict(h) for h in history],
    }, buffer)
    return artifacts.write_bytes(path, buffer.getvalue())


def check_trainable(model_name: str) -> None:
    if model_name not in TRAINABLE:
        raise UserError(f"no training recipe for {model_name!r}; `mame-deploy train` trains {', '.join(TRAINABLE)} "
                        "(the Vim ImageNet checkpoints come from hustvl/Vim)")
