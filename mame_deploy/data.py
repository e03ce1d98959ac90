"""Labelled images for evaluation and training: ImageFolder trees (pillow + numpy, no
torchvision), the preprocessing each model expects, and the digits data of vim_digits.

Preprocessing is chosen by the model's registry entry (``spec.info["preprocess"]``):
"imagenet" (the Vim checkpoints, see shared docs/vim.md) or "digits" (grey levels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from mame_deploy.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CROP_PCT = 0.875  # timm's eval transform: resize the short side to size / 0.875, crop
DIGITS_MEAN, DIGITS_STD = 0.5, 0.5
DIGITS_SUBSETS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------
# Preprocessing: PIL image -> (C, H, W) float32 tensor


def imagenet_preprocess(image: Image.Image, size: int) -> Tensor:
    """Short side to floor(size / 0.875) (bicubic), centre crop ``size``, [0, 1], normalise."""
    image = image.convert("RGB")
    short = math.floor(size / IMAGENET_CROP_PCT)
    w, h = image.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def digits_preprocess(grey: np.ndarray, size: int) -> Tensor:
    """Grey levels in [0, 1] of any size -> (1, size, size): bilinear resize, normalise."""
    image = Image.fromarray(np.asarray(grey, dtype=np.float32))  # mode "F"
    x = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32)
    return torch.from_numpy((x - DIGITS_MEAN) / DIGITS_STD)[None]


def preprocess_kind(model_name: str) -> str:
    from mame_deploy.models import get_spec

    return get_spec(model_name).info.get("preprocess", "imagenet")


def load_image(path: Path, kind: str, size: int) -> Tensor:
    try:
        with Image.open(path) as image:
            image.load()
            if kind == "digits":
                return digits_preprocess(np.asarray(image.convert("L"), dtype=np.float32) / 255.0, size)
            return imagenet_preprocess(image, size)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path} ({exc}); remove it or replace it with a valid image") from None


# ---------------------------------------------------------------------------------------------
# Datasets: something with a length, a name and batches of (images, labels)


@dataclass
class TensorImages:
    """Preprocessed images held in memory (the digits splits)."""

    images: Tensor  # (N, C, H, W)
    labels: Tensor  # (N,) int64
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self), batch_size):
            yield self.images[i:i + batch_size], self.labels[i:i + batch_size]


@dataclass
class FolderImages:
    """An ImageFolder tree (ROOT/CLASS/IMAGE), read lazily batch by batch."""

    samples: list[tuple[Path, int]]
    classes: list[str]
    kind: str   # preprocessing: "imagenet" or "digits"
    size: int
    name: str

    def __len__(self) -> int:
        return len(self.samples)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self), batch_size):
            chunk = self.samples[i:i + batch_size]
            images = torch.stack([load_image(path, self.kind, self.size) for path, _ in chunk])
            yield images, torch.tensor([label for _, label in chunk], dtype=torch.long)


def image_folder(root: str | Path, num_classes: int, kind: str, size: int) -> FolderImages:
    """Read ROOT/CLASS/*.EXT. Class folders named by integers (0, 1, ...) give those labels;
    other names (ImageNet synsets) are sorted and must be exactly ``num_classes`` folders."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data {root} is not a directory; pass an ImageFolder root (ROOT/CLASS/IMAGE)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(f"--data {root} has no class folders; expected ROOT/CLASS/IMAGE files")
    names = [p.name for p in class_dirs]
    if all(name.isdigit() for name in names):
        labels = [int(name) for name in names]
    elif len(names) == num_classes:
        labels = list(range(num_classes))
    else:
        raise UserError(f"--data {root} has {len(names)} class folders but the model has {num_classes} classes; "
                        f"give all {num_classes} (sorted names map to labels) or name folders by label index")
    if max(labels) >= num_classes:
        raise UserError(f"--data {root} has a class folder {max(labels)} but the model has {num_classes} classes "
                        f"(labels 0..{num_classes - 1})")
    samples = [
        (path, label)
        for folder, label in zip(class_dirs, labels)
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    ]
    if not samples:
        raise UserError(f"--data {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return FolderImages(samples, names, kind, size, name=str(root))


# ---------------------------------------------------------------------------------------------
# scikit-learn's handwritten digits (1797 images, 8 x 8, grey levels 0..16)


def digits_indices(subset: str, count: int) -> np.ndarray:
    """The fixed split, by index so it never depends on a random generator:
    test = every 4th image (index % 4 == 3), val = index % 8 == 1, train = the rest."""
    if subset not in DIGITS_SUBSETS:
        raise UserError(f"unknown digits subset {subset!r}; use one of {', '.join(DIGITS_SUBSETS)}")
    i = np.arange(count)
    test, val = i % 4 == 3, i % 8 == 1
    mask = {"test": test, "val": val, "train": ~(test | val)}[subset]
    return i[mask]


def digits_raw(subset: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8) grey levels in [0, 1] and (N,) labels of one subset."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = digits_indices(subset, len(digits.target))
    return digits.images[idx].astype(np.float32) / 16.0, digits.target[idx].astype(np.int64)


def digits_dataset(subset: str, size: int) -> TensorImages:
    grey, labels = digits_raw(subset)
    images = torch.stack([digits_preprocess(g, size) for g in grey])
    return TensorImages(images, torch.from_numpy(labels), name=f"digits/{subset}")


def dataset_for(model_name: str, config, data: Optional[str | Path] = None,
                subset: Optional[str] = None):
    """The labelled images to evaluate ``model_name`` on: ``data`` (an ImageFolder) if given,
    else the model's bundled data (vim_digits: its ``subset``, default test)."""
    kind = preprocess_kind(model_name)
    if data is not None:
        if subset is not None:
            raise UserError("--subset picks a part of the bundled digits data; it does not apply with --data")
        return image_folder(data, config.num_classes, kind, config.img_size)
    if kind == "digits":
        return digits_dataset(subset or "test", config.img_size)
    raise UserError(f"{model_name} has no bundled data; pass --data DIR (an ImageFolder, e.g. ImageNet val "
                    "with one folder per class)")

