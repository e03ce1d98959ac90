"""Accuracy parity of an exported file against the PyTorch source its manifest describes.

Both run the same images (random ones from a seed, a labelled image folder, or the model's
bundled labelled data such as vim_digits' test split); the report
gives the largest absolute and relative logit error, the mean cosine similarity of the logit
vectors, how often the top-1 classes agree, and top-1 accuracy of each when labels are known.
The tolerance is the issue's: max abs error <= 1e-4 * max |logit| and identical top-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np

from mame_deploy import artifacts, manifest as manifests
from mame_deploy import memory
from mame_deploy.errors import UserError
from mame_deploy.onnx_export import INPUT_NAME, OUTPUT_NAME
from mame_deploy.runners import TorchRunner, load_onnx_file, onnxruntime_runner

REL_TOLERANCE = 1e-4  # of the largest |logit| of the reference
DEFAULT_SAMPLES = 16


@dataclass
class Batches:
    """Images (and labels, or None) read in the batches a file accepts; a folder is read lazily."""

    name: str
    count: int
    labels: Optional[np.ndarray]
    read: Callable[[int, int], np.ndarray]   # (start, stop) -> float32 images (stop - start, C, H, W)

    def __len__(self):
        return self.count

    def chunks(self, batch: int) -> Iterator[tuple[np.ndarray, int]]:
        """(batch of exactly ``batch`` images, number of real ones): a short last batch is padded
        with zeros so a file with a static batch size can run it."""
        for start in range(0, self.count, batch):
            part = self.read(start, min(start + batch, self.count))
            real = len(part)
            if real < batch:
                part = np.concatenate([part, np.zeros((batch - real, *part.shape[1:]), part.dtype)])
            yield np.ascontiguousarray(part, dtype=np.float32), real


def random_images(config, samples: int, seed: int = 0) -> Batches:
    """Standard-normal images: what a normalised real image looks like to the network."""
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((samples, config.in_chans, config.img_size, config.img_size), dtype=np.float32)
    return Batches(f"random normal images, seed {seed}", samples, None, lambda a, b: images[a:b])


def folder_images(data_dir: Union[str, Path, None], model_name: str, config, samples: Optional[int]) -> Batches:
    """Labelled images preprocessed as ``model_name`` expects: the ImageFolder ``data_dir``
    (ROOT/CLASS/IMAGE), or with None the model's bundled data (vim_digits: its test split).
    ``samples`` takes that many, evenly spaced over the set (folders are sorted by class)."""
    from mame_deploy import data

    dataset = data.dataset_for(model_name, config, data_dir)
    keep = np.arange(len(dataset))
    if samples is not None:
        if samples < 1:
            raise UserError(f"--samples must be at least 1, got {samples}")
        keep = np.unique(np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).round().astype(int))
    if isinstance(dataset, data.FolderImages):
        chosen = [dataset.samples[i] for i in keep]
        labels = np.array([label for _, label in chosen], dtype=np.int64)

        def read(a: int, b: int) -> np.ndarray:
            return np.stack([data.load_image(path, dataset.kind, dataset.size).numpy() for path, _ in chosen[a:b]])
    else:  # held in memory
        images, labels = dataset.images[keep].numpy(), dataset.labels[keep].numpy()

        def read(a: int, b: int) -> np.ndarray:
            return images[a:b]
    return Batches(dataset.name, len(keep), labels, read)


def has_bundled_data(model_name: str) -> bool:
    from mame_deploy import data

    return data.preprocess_kind(model_name) == "digits"


def compare(outputs: np.ndarray, reference: np.ndarray, labels: Optional[np.ndarray] = None) -> dict:
    """Parity metrics of ``outputs`` against ``reference`` logits (samples x classes)."""
    outputs, reference = outputs.astype(np.float64), reference.astype(np.float64)
    diff = np.abs(outputs - reference)
    scale = float(np.abs(reference).max())
    norms = np.linalg.norm(outputs, axis=1) * np.linalg.norm(reference, axis=1)
    cosine = np.sum(outputs * reference, axis=1) / np.maximum(norms, 1e-30)
    top1, top1_ref = outputs.argmax(1), reference.argmax(1)
    report = {
        "samples": int(len(reference)),
        "max_abs_err": float(diff.max()),
        "max_abs_logit": scale,
        # Relative to the logits' scale: elementwise ratios explode at logits near zero.
        "max_rel_err": float(diff.max() / scale) if scale > 0 else float(diff.max()),
        "mean_cosine": float(cosine.mean()),
        "top1_agreement": float(np.mean(top1 == top1_ref)),
    }
    report["passed"] = bool(report["max_abs_err"] <= REL_TOLERANCE * scale and report["top1_agreement"] == 1.0)
    if labels is not None:
        report["top1_accuracy"] = float(np.mean(top1 == labels))
        report["top1_accuracy_reference"] = float(np.mean(top1_ref == labels))
    return report


def run(runner, batches: Batches, batch: int, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """All logits of ``runner`` over ``batches``, in ``batch``-sized calls."""
    logits = []
    with runner:
        for images, real in batches.chunks(batch):
            out = runner.infer({INPUT_NAME: images}, check_inputs=False)[OUTPUT_NAME]
            logits.append(np.array(out[:real]))
            if progress:
                progress(real)
    return np.concatenate(logits)


def validate(
    onnx_path: Union[str, Path],
    data_dir: Union[str, Path, None] = None,
    samples: Optional[int] = None,
    batch: Optional[int] = None,
    device: str = "cpu",
    threads: Optional[int] = None,
    seed: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> dict:
    """Run ``onnx_path`` in onnxruntime and its rebuilt PyTorch source on the same inputs."""
    onnx_path = Path(onnx_path)
    proto = load_onnx_file(onnx_path)
    record = manifests.read_manifest(onnx_path, artifacts.file_sha256(onnx_path))
    manifests.check_onnx_input(proto, record, onnx_path)
    source = manifests.source_from_manifest(record)
    model = manifests.build_model(source, record["schedule"])
    cfg = model.config
    if data_dir is not None or has_bundled_data(source.model):
        batches = folder_images(data_dir, source.model, cfg, samples)
    else:
        batches = random_images(cfg, samples or DEFAULT_SAMPLES, seed)
    batch = _batch_size(record, batch, len(batches))
    memory.check_forward(cfg, batch, device, "--batch", source.model)

    onnx_logits = run(onnxruntime_runner(onnx_path, device, threads), batches, batch, progress)
    torch_logits = run(TorchRunner(model, device, threads), batches, batch, progress)
    report = {
        "onnx": str(onnx_path),
        "model": source.model,
        "method": source.method,
        "ratio": source.ratio,
        "schedule_spec": source.schedule_spec,
        "tokens_per_layer": record["tokens_per_layer"],
        "scan": record["scan"],
        "batch": batch,
        "device": device,
        "data": batches.name,
        **compare(onnx_logits, torch_logits, batches.labels),
    }
    return report


def _batch_size(record: dict, requested: Optional[int], samples: int) -> int:
    fixed = record["batch"]
    if fixed is not None:
        if requested is not None and requested != fixed:
            raise UserError(f"the file was exported for batch {fixed}, not {requested}; drop --batch or "
                            f"re-export with --batch {requested} (or --dynamic-batch)")
        return int(fixed)
    if requested is not None and requested < 1:
        raise UserError(f"--batch must be at least 1, got {requested}")
    return requested or min(samples, 8)
