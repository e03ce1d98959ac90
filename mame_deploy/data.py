"""Labelled images for evaluation and training: ImageFolder trees (pillow + numpy, no
torchvision), the preprocessing each model expects, the digits data of vim_digits and the
Fashion-MNIST data of vim_fashion.

Preprocessing is chosen by the model's registry entry (``spec.info["preprocess"]``):
"imagenet" (the Vim checkpoints, see docs/vim.md), "digits" (grey levels) or
"fashion" (8-bit grey images normalised with the Fashion-MNIST training statistics).
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path
from functools import lru_cache
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
# Fashion-MNIST, from Debian's dataset-fashion-mnist package (or a folder named by the variable).
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_ENV = "MAME_FASHION_MNIST"
FASHION_FILES = {  # part -> (images, labels), idx format, gzip-compressed
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # grey level mean / std of the 60,000 training images
FASHION_SUBSETS = ("train", "val", "test")
FASHION_VAL_EVERY = 12  # val = training images with index % 12 == 11: 5,000 of the 60,000
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


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


def fashion_preprocess(image: Image.Image | np.ndarray, size: int) -> Tensor:
    """8-bit grey image (PIL or uint8 array) -> (1, size, size): bilinear resize only when it
    is not ``size`` square already, [0, 1], normalise with the Fashion-MNIST statistics."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return _fashion_normalise(np.asarray(image, dtype=np.uint8))[None]


def _fashion_normalise(grey: np.ndarray) -> Tensor:
    """uint8 grey levels of any shape -> float32, normalised."""
    x = grey.astype(np.float32) / 255.0
    return torch.from_numpy((x - np.float32(FASHION_MEAN)) / np.float32(FASHION_STD))


def preprocess_kind(model_name: str) -> str:
    from mame_deploy.models import get_spec

    return get_spec(model_name).info.get("preprocess", "imagenet")


def load_image(path: Path, kind: str, size: int) -> Tensor:
    try:
        with Image.open(path) as image:
            image.load()
            if kind == "digits":
                return digits_preprocess(np.asarray(image.convert("L"), dtype=np.float32) / 255.0, size)
            if kind == "fashion":
                return fashion_preprocess(image, size)
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
        raise UserError(f"`data` {root} is not a directory; pass an ImageFolder root (ROOT/CLASS/IMAGE)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(f"`data` {root} has no class folders; expected ROOT/CLASS/IMAGE files")
    names = [p.name for p in class_dirs]
    if all(name.isdigit() for name in names):
        labels = [int(name) for name in names]
    elif len(names) == num_classes:
        labels = list(range(num_classes))
    else:
        raise UserError(f"`data` {root} has {len(names)} class folders but the model has {num_classes} classes; "
                        f"give all {num_classes} (sorted names map to labels) or name folders by label index")
    if max(labels) >= num_classes:
        raise UserError(f"`data` {root} has a class folder {max(labels)} but the model has {num_classes} classes "
                        f"(labels 0..{num_classes - 1})")
    samples = [
        (path, label)
        for folder, label in zip(class_dirs, labels)
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    ]
    if not samples:
        raise UserError(f"`data` {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
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


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (60,000 training + 10,000 test images, 28 x 28, 10 classes)


def fashion_root() -> Path:
    """The folder holding the four Fashion-MNIST files: $MAME_FASHION_MNIST, else the Debian
    package's. One-line UserError naming the package when a file is missing."""
    root = Path(os.environ.get(FASHION_ENV) or FASHION_DIR)
    for images, labels in FASHION_FILES.values():
        for name in (images, labels):
            if not (root / name).is_file():
                raise UserError(
                    f"Fashion-MNIST is not installed: {root / name} is missing; install the Debian package "
                    f"{FASHION_PACKAGE} (apt-get install {FASHION_PACKAGE}) or set {FASHION_ENV} to a folder "
                    "holding its four idx .gz files")
    return root


def fashion_available() -> bool:
    try:
        fashion_root()
    except UserError:
        return False
    return True


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (gzip-compressed): big-endian magic 0x0000 08 NDIM, NDIM sizes, uint8 data."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path} ({exc}); reinstall {FASHION_PACKAGE}") from None
    header = 4 + 4 * ndim
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
    if magic != 0x0800 + ndim or len(data) < header:
        raise UserError(f"{path} is not an idx file of {ndim} dimension(s) (magic {magic:#x}); "
                        f"reinstall {FASHION_PACKAGE}")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + math.prod(shape):
        raise UserError(f"{path} holds {len(data) - header} bytes of data, its header says {shape}; "
                        f"reinstall {FASHION_PACKAGE}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


@lru_cache(maxsize=4)
def _fashion_part(root: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = FASHION_FILES[part]
    images, labels = read_idx(root / images_file, 3), read_idx(root / labels_file, 1)
    if len(images) != len(labels):
        raise UserError(f"{root}: {len(images)} {part} images but {len(labels)} labels; reinstall {FASHION_PACKAGE}")
    return images, labels.astype(np.int64)


def fashion_indices(subset: str, count: int) -> np.ndarray:
    """Indices of ``subset`` in its file, by rule so they never depend on a random generator:
    val = every 12th training image (index % 12 == 11), train = the other 55,000, test = t10k."""
    if subset not in FASHION_SUBSETS:
        raise UserError(f"unknown Fashion-MNIST subset {subset!r}; use one of {', '.join(FASHION_SUBSETS)}")
    i = np.arange(count)
    if subset == "test":
        return i
    val = i % FASHION_VAL_EVERY == FASHION_VAL_EVERY - 1
    return i[val] if subset == "val" else i[~val]


def fashion_raw(subset: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 grey images and (N,) int64 labels of one subset."""
    fashion_indices(subset, 0)  # a bad subset name fails before any file is read
    images, labels = _fashion_part(fashion_root(), "t10k" if subset == "test" else "train")
    idx = fashion_indices(subset, len(labels))
    return images[idx], labels[idx]


def spread_indices(count: int, samples: int) -> np.ndarray:
    """``samples`` indices evenly spaced over ``count`` images, first and last included (the
    rule of ``validate --samples``; the CI subset of vim_fashion is spread_indices(10000, 1000))."""
    return np.unique(np.linspace(0, count - 1, min(samples, count)).round().astype(int))


def fashion_dataset(subset: str, size: int = 28) -> TensorImages:
    grey, labels = fashion_raw(subset)
    if grey.shape[1:] == (size, size):  # the common case, vectorised; same numbers as fashion_preprocess
        images = _fashion_normalise(grey)[:, None]
    else:
        images = torch.stack([fashion_preprocess(g, size) for g in grey])
    return TensorImages(images, torch.from_numpy(labels), name=f"fashion-mnist/{subset}")


# ---------------------------------------------------------------------------------------------
# What a model is evaluated on

BUNDLED_KINDS = ("digits", "fashion")  # preprocessing kinds that come with their own labelled data


def has_bundled_data(model_name: str) -> bool:
    return preprocess_kind(model_name) in BUNDLED_KINDS


def dataset_for(model_name: str, config, data: Optional[str | Path] = None,
                subset: Optional[str] = None):
    """The labelled images to evaluate ``model_name`` on: ``data`` (an ImageFolder) if given,
    else the model's bundled data (vim_digits, vim_fashion: its ``subset``, default test)."""
    kind = preprocess_kind(model_name)
    if data is not None:
        if subset is not None:
            raise UserError("`subset` picks a part of the model's bundled data; it does not apply with `data`")
        return image_folder(data, config.num_classes, kind, config.img_size)
    if kind == "digits":
        return digits_dataset(subset or "test", config.img_size)
    if kind == "fashion":
        return fashion_dataset(subset or "test", config.img_size)
    raise UserError(f"{model_name} has no bundled data; pass `data` DIR (an ImageFolder, e.g. ImageNet val "
                    "with one folder per class)")

