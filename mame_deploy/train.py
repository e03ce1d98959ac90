"""Training recipes of the bundled models, from their seeded initialisation or fine-tuned with
token merging active.

vim_digits trains on scikit-learn's digits on the CPU in minutes; vim_fashion on Fashion-MNIST
on a GPU, with mamba-ssm's scan for the backward pass (the reference scan's backward is a
Python loop). One generator (the seed) drives initialisation order, shuffling and augmentation,
so a CPU run is bit-reproducible for a given seed and thread count; GPU runs are not bit-exact
(mamba-ssm's backward accumulates with atomics).

Fine-tuning (a merge setting, usually with ``init`` weights) patches the model before training,
so gradients flow through every merge step -- mame_deploy.merge's reference, built from gathers,
weighted means and scatters -- and through the scans of the shortened sequences. Which token
merges into which is a discrete choice; the merged means' weights (size x Delta) carry gradient
back into the blocks' step sizes.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mame_deploy import data
from mame_deploy.errors import UserError
from mame_deploy.evaluate import Setting, evaluate
from mame_deploy.patch import patch

BACKGROUND = (0.0 - data.DIGITS_MEAN) / data.DIGITS_STD  # a blank digits pixel after normalisation
_BACKGROUNDS = {"digits": BACKGROUND, "fashion": (0.0 - data.FASHION_MEAN) / data.FASHION_STD}


@dataclass(frozen=True)
class Recipe:
    epochs: int = 12
    batch_size: int = 48
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    shift: int = 3            # random translation: pad this many background pixels, crop back
    flip: bool = False        # random horizontal flip (clothes are mirror-symmetric, digits are not)
    clip_grad: Optional[float] = None  # max global gradient norm
    amp: bool = False         # bf16 autocast on CUDA (merge steps stay float32)
    eval_batch_size: int = 256
    seed: int = 0


# The recipe of each trainable model (its shipped weights come from these defaults), and what
# fine-tuning with merging changes in it: a lower peak learning rate, a short warm-up, few epochs.
RECIPES = {
    "vim_digits": Recipe(),
    "vim_fashion": Recipe(epochs=30, batch_size=256, lr=2e-3, weight_decay=0.05, warmup_epochs=1.0,
                          label_smoothing=0.1, shift=2, flip=True, clip_grad=1.0, amp=True, eval_batch_size=1000),
}
FINETUNE = {
    "vim_digits": dict(epochs=3, lr=1e-3, warmup_epochs=0.5),
    "vim_fashion": dict(epochs=5, lr=5e-4, warmup_epochs=0.5),
}
TRAINABLE = tuple(RECIPES)


def recipe_for(model_name: str, finetune: bool = False, **changes) -> Recipe:
    """The model's recipe (its fine-tuning variant with ``finetune``), with ``changes`` applied
    (None values ignored)."""
    check_trainable(model_name)
    recipe = RECIPES[model_name]
    if finetune:
        recipe = dataclasses.replace(recipe, **FINETUNE[model_name])
    return dataclasses.replace(recipe, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class EpochLog:
    epoch: int
    loss: float
    val_accuracy: float
    seconds: float = 0.0      # training time of the epoch (the validation pass not included)


def _shift(images: Tensor, max_shift: int, background: float, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with ``background``: pad,
    then crop a random window (one gather for the batch, on the images' device)."""
    if max_shift == 0:
        return images
    B, C, H, W = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=background)
    offsets = torch.randint(0, 2 * max_shift + 1, (B, 2), generator=gen).to(images.device)
    rows = offsets[:, :1] + torch.arange(H, device=images.device)   # (B, H)
    cols = offsets[:, 1:] + torch.arange(W, device=images.device)   # (B, W)
    batch = torch.arange(B, device=images.device)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, H, W, C) -> NCHW


def _flip(images: Tensor, gen: torch.Generator) -> Tensor:
    mirror = (torch.rand(images.shape[0], generator=gen) < 0.5).to(images.device)
    return torch.where(mirror[:, None, None, None], images.flip(-1), images)


def augment(images: Tensor, recipe: Recipe, background: float, gen: torch.Generator) -> Tensor:
    x = _shift(images, recipe.shift, background, gen)
    return _flip(x, gen) if recipe.flip else x


class _Float32Merge:
    """The installed merge hook, run with autocast off: under bf16 autocast the matching's
    similarity matmul would run in bf16 and pick other partners than the float32 model that
    is evaluated and exported."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # schedule, start, class_token, ... of the real hook
        return getattr(self.inner, name)

    def __call__(self, layer, hidden, residual, score, state, score_scale=1.0):
        with torch.autocast(hidden.device.type, enabled=False):
            return self.inner(layer, hidden, residual, score, state, score_scale)


def _splits(model_name: str, config):
    kind = data.preprocess_kind(model_name)
    if kind == "digits":
        return data.digits_dataset("train", config.img_size), data.digits_dataset("val", config.img_size), kind
    return data.fashion_dataset("train", config.img_size), data.fashion_dataset("val", config.img_size), kind


def _on(dataset: data.TensorImages, device: str) -> data.TensorImages:
    return data.TensorImages(dataset.images.to(device), dataset.labels.to(device), dataset.name)


def check_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        raise UserError(f"`device` must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("`device` cuda needs a CUDA GPU and a CUDA build of torch; none is available here")
    return device


def build(model_name: str, seed: int = 0, init: Optional[str | Path] = None,
          merge: Optional[Setting] = None, **overrides):
    """The model to train: seeded initialisation, then ``init`` weights (strict load), then
    merging as ``merge`` says."""
    from mame_deploy.models import get_spec, init_weights, load_checkpoint

    spec = get_spec(model_name)
    try:
        config = dataclasses.replace(spec.config, **overrides)
    except TypeError as exc:
        raise UserError(f"unknown config option for {model_name}: {exc}") from None
    torch.manual_seed(seed)
    model = init_weights(spec.build(config), seed)
    if init is not None:
        load_checkpoint(model, init, model_name)
    model.model_name = model_name
    if merge is not None:
        patch(model, ratio=merge.ratio, schedule=merge.schedule, method=merge.method, layers=merge.layers,
              **(merge.options or {}))
    return model


def train(
    model_name: str,
    recipe: Optional[Recipe] = None,
    init: Optional[str | Path] = None,
    merge: Optional[Setting] = None,
    device: str = "cpu",
    scan_backend: Optional[str] = None,
    on_step: Optional[Callable[[int, int, float], None]] = None,
    on_epoch: Optional[Callable[[EpochLog], None]] = None,
    limit: Optional[int] = None,
    eval_limit: Optional[int] = None,
    **overrides,
):
    """Train ``model_name`` on its train subset (from ``init`` weights if given, merging as
    ``merge`` says); returns the model (eval mode, on ``device``) and one ``EpochLog`` per epoch
    (top-1 on the val subset, merging active). ``limit`` (first N training images),
    ``eval_limit`` (first N val images) and config ``overrides`` exist for quick checks.
    ``scan_backend``: default mamba-ssm's kernel on CUDA (it has a backward), the op on the CPU."""
    check_trainable(model_name)
    check_device(device)
    recipe = recipe or recipe_for(model_name, finetune=init is not None)
    if recipe.epochs < 1 or recipe.batch_size < 1 or recipe.warmup_epochs <= 0:
        raise UserError("a recipe needs epochs >= 1, batch_size >= 1 and warmup_epochs > 0")
    model = build(model_name, recipe.seed, init, merge, **overrides)
    config = model.config
    train_set, val, kind = _splits(model_name, config)
    val = _on(val, device)
    images, labels = train_set.images[:limit].to(device), train_set.labels[:limit].to(device)
    background = _BACKGROUNDS[kind]
    gen = torch.Generator().manual_seed(recipe.seed)
    model.to(device)
    model.set_scan_backend(scan_backend or ("mamba_ssm" if device == "cuda" else "op"))
    if merge is not None:
        model.token_merge = _Float32Merge(model.token_merge)
    amp = recipe.amp and device == "cuda"

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
    # On a GPU, reading the loss every step would wait for each step to finish.
    report_every = 1 if device == "cpu" else 25

    history, step = [], 0
    for epoch in range(recipe.epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(labels), generator=gen)
        running = 0.0 if device == "cpu" else torch.zeros((), device=device)
        for i in range(0, len(labels), recipe.batch_size):
            idx = order[i:i + recipe.batch_size].to(device)
            x = augment(images[idx], recipe, background, gen)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad)
            opt.step()
            sched.step()
            running += (loss.item() if device == "cpu" else loss.detach()) * len(idx)
            step += 1
            if on_step is not None and (step % report_every == 0 or step == total):
                on_step(step, total, loss.item())
        running = float(running)
        seconds = time.perf_counter() - started
        correct, total_val = evaluate(model, val, batch_size=recipe.eval_batch_size, limit=eval_limit)
        log = EpochLog(epoch + 1, running / len(labels), correct / total_val, round(seconds, 2))
        history.append(log)
        if on_epoch is not None:
            on_epoch(log)
    if merge is not None:
        model.token_merge = model.token_merge.inner
    return model.eval(), history


def train_digits(
    recipe: Recipe = Recipe(),
    on_step: Optional[Callable[[int, int, float], None]] = None,
    on_epoch: Optional[Callable[[EpochLog], None]] = None,
    limit: Optional[int] = None,
    **overrides,
):
    """vim_digits from its seeded initialisation (the shipped weights: the default recipe)."""
    return train("vim_digits", recipe, on_step=on_step, on_epoch=on_epoch, limit=limit, **overrides)


def save_weights(model, path: str | Path, recipe: Recipe, history: list[EpochLog], force: bool = False,
                 init: Optional[str | Path] = None, merge: Optional[Setting] = None,
                 seconds: Optional[float] = None, device: Optional[str] = None) -> Path:
    """The checkpoint, written atomically: ``{"model": state_dict, "config", "recipe", "history"}``
    and, for fine-tuned weights, ``"init"`` (file and sha256) and ``"merge"``
    (mame_deploy.finetuned's record, which export and validate rebuild the merging from)."""
    from mame_deploy import artifacts
    from mame_deploy.finetuned import MERGE_KEY, merge_record

    path = Path(path)
    artifacts.check_writable([path], force)
    record = {
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "recipe": dataclasses.asdict(recipe),
        "history": [dataclasses.asdict(h) for h in history],
    }
    if seconds is not None:
        record["training"] = {"seconds": round(seconds, 1), "device": device,
                              "torch": str(torch.__version__)}  # TorchVersion would not load safely
    if init is not None:
        record["init"] = {"file": Path(init).name, "sha256": artifacts.file_sha256(init)}
    if merge is not None:
        merge_info = merge_record(model, merge.ratio, merge.schedule)
        if merge_info is not None:
            record[MERGE_KEY] = merge_info
    buffer = io.BytesIO()
    torch.save(record, buffer)
    return artifacts.write_bytes(path, buffer.getvalue())


def check_trainable(model_name: str) -> None:
    if model_name not in TRAINABLE:
        raise UserError(f"no training recipe for {model_name!r}; `mame-deploy train` trains {', '.join(TRAINABLE)} "
                        "(the Vim ImageNet checkpoints come from hustvl/Vim)")
