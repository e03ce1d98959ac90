"""Accuracy parity of an exported file -- ONNX in onnxruntime, or a TensorRT engine -- against
the PyTorch source its manifest describes. Both kinds go through the same steps; how each is
run is ``runners.Artifact``'s business.

Both run the same images (random ones from a seed, a labelled image folder, or the model's
bundled labelled data such as vim_digits' test split). Merged models are compared decision
first: every merge step's choice of tokens is traced in both runtimes (mame_deploy.decisions),
and the parity rule -- max abs error <= 1e-4 x max |logit| and identical top-1 -- applies to
the samples on which every step decided alike. Samples on which a step decided otherwise are
counted per step, with their effect on top-1, and each must be a near-tie: PyTorch itself
decides that step differently under input noise far below the tolerance
(``decisions.near_tie``). The report also gives the mean cosine similarity of the logits and,
with labels, the top-1 accuracy of each side. docs/validation.md says why these criteria.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np

from mame_deploy import decisions, memory
from mame_deploy import source as sources
from mame_deploy.errors import UserError
from mame_deploy.manifest import INPUT_NAME, OUTPUT_NAME
from mame_deploy.ops.onnx_functions import custom_nodes
from mame_deploy.ops.token_merge.contract import ONNX_OP_TYPE as MERGE_OP
from mame_deploy.runners import TorchRunner, open_artifact

REL_TOLERANCE = 1e-4  # of the largest |logit| of the reference
# Reduced-precision engines cannot meet the fp32 rule (max abs error <= 1e-4 * max |logit|);
# they pass on the direction of the logits and the predicted class.
REDUCED_PRECISION_TOLERANCE = {
    "fp16": {"mean_cosine": 0.999, "top1_agreement": 0.99},
    "bf16": {"mean_cosine": 0.995, "top1_agreement": 0.97},
}
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
        raise UserError(f"`samples` must be at least 1, got {samples}")
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
            raise UserError(f"`samples` must be at least 1, got {samples}")
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

    return data.has_bundled_data(model_name)  # vim_digits, vim_fashion


def _parity(outputs: np.ndarray, reference: np.ndarray, scale: float) -> dict:
    diff = np.abs(outputs - reference)
    norms = np.linalg.norm(outputs, axis=1) * np.linalg.norm(reference, axis=1)
    cosine = np.sum(outputs * reference, axis=1) / np.maximum(norms, 1e-30)
    worst = float(diff.max()) if diff.size else 0.0
    return {
        "max_abs_err": worst,
        # Relative to the logits' scale: elementwise ratios explode at logits near zero.
        "max_rel_err": worst / scale if scale > 0 else worst,
        "mean_cosine": float(cosine.mean()) if cosine.size else 1.0,
        "top1_agreement": float(np.mean(outputs.argmax(1) == reference.argmax(1))) if len(reference) else 1.0,
    }


def compare(outputs: np.ndarray, reference: np.ndarray, labels: Optional[np.ndarray] = None,
            flipped: Optional[np.ndarray] = None, near_ties: Optional[np.ndarray] = None) -> dict:
    """Parity metrics of ``outputs`` against ``reference`` logits (samples x classes).

    ``flipped`` (per sample: a merge step decided differently, see mame_deploy.decisions) splits
    the samples: those whose decisions agree must meet the parity rule (max abs error <=
    REL_TOLERANCE x max |logit|, identical top-1); each flipped one must be a near-tie
    (``near_ties``: PyTorch itself decides that step differently under tiny input noise), and
    is reported with its effect on top-1. Without ``flipped`` (decisions not traced) every
    sample must meet the parity rule.
    """
    outputs, reference = outputs.astype(np.float64), reference.astype(np.float64)
    scale = float(np.abs(reference).max())
    report = {"samples": int(len(reference)), "max_abs_logit": scale, **_parity(outputs, reference, scale)}
    agree = np.ones(len(reference), bool) if flipped is None else ~np.asarray(flipped, bool)
    same = _parity(outputs[agree], reference[agree], scale)
    report.update({
        "decisions_traced": flipped is not None,
        "agreeing_samples": int(agree.sum()),
        "flipped_samples": int((~agree).sum()),
        "flip_rate": float((~agree).mean()) if len(agree) else 0.0,
        "unexplained_flips": int(np.sum(~agree & ~(near_ties if near_ties is not None else np.zeros_like(agree)))),
        "max_abs_err_agreeing": same["max_abs_err"],
        "max_rel_err_agreeing": same["max_rel_err"],
        "top1_agreement_agreeing": same["top1_agreement"],
        "mean_cosine_agreeing": same["mean_cosine"],
        "top1_changed_by_flips": int(np.sum((outputs.argmax(1) != reference.argmax(1)) & ~agree)),
    })
    parity_ok = same["max_abs_err"] <= REL_TOLERANCE * scale and same["top1_agreement"] == 1.0
    report["passed"] = bool(parity_ok and report["unexplained_flips"] == 0)
    if labels is not None:
        report["top1_accuracy"] = float(np.mean(outputs.argmax(1) == labels))
        report["top1_accuracy_reference"] = float(np.mean(reference.argmax(1) == labels))
    return report


def run(runner, batches: Batches, batch: int, progress: Optional[Callable[[int], None]] = None
        ) -> dict[str, np.ndarray]:
    """Every output of ``runner`` (logits, and decision traces where it gives them) over
    ``batches``, in ``batch``-sized calls, concatenated over the real images."""
    parts: dict[str, list] = {}
    with runner:
        for images, real in batches.chunks(batch):
            for name, value in runner.infer({INPUT_NAME: images}, check_inputs=False).items():
                parts.setdefault(name, []).append(np.array(value[:real]))
            if progress:
                progress(real)
    return {name: np.concatenate(values) for name, values in parts.items()}


def passed(report: dict, precision: str) -> bool:
    """fp32: the parity rule of ``compare`` (already in ``report``); fp16/bf16: the direction of
    the logits and the predicted class (``REDUCED_PRECISION_TOLERANCE``). Where merge decisions
    were traced (half ONNX files), as for fp32: the samples whose decisions agree meet that rule
    and every flipped one is a near-tie at the precision's own noise (``near_tie_noise``)."""
    rule = REDUCED_PRECISION_TOLERANCE.get(precision)
    if rule is None:
        return bool(report["passed"])
    if report.get("decisions_traced"):
        return report["unexplained_flips"] == 0 and all(
            report[f"{key}_agreeing"] >= floor for key, floor in rule.items())
    return all(report[key] >= floor for key, floor in rule.items())


# A half file's merge-step inputs differ between runtimes by their roundings to the half type
# after differently ordered accumulations upstream: a flip is a near-tie when noise of this many
# units in the last place changes PyTorch's own decision (vim_digits, ratio 0.5, fp16, the 449
# test images: 1 ulp explained 31 of the 32 flips, 2 ulps all of them; docs/export.md).
NEAR_TIE_ULPS = 2


def near_tie_noise(precision: str) -> float:
    """Relative noise under which a flipped decision counts as a near-tie: the fp32 parity
    tolerance, or for a half-precision file NEAR_TIE_ULPS units in the last place of its type."""
    import torch

    if precision not in REDUCED_PRECISION_TOLERANCE:
        return decisions.NEAR_TIE_NOISE
    return max(decisions.NEAR_TIE_NOISE, NEAR_TIE_ULPS * torch.finfo(sources.TORCH_DTYPES[precision]).eps)


def validate(
    path: Union[str, Path],
    data_dir: Union[str, Path, None] = None,
    samples: Optional[int] = None,
    batch: Optional[int] = None,
    device: str = "cpu",
    threads: Optional[int] = None,
    seed: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> dict:
    """Run the artifact at ``path`` (an ONNX file in onnxruntime, or a TensorRT engine) and its
    rebuilt PyTorch source on the same inputs. Where the runtime can report them (ONNX files
    with TokenMerge nodes), merge decisions are traced in both and compared first."""
    artifact = open_artifact(path, device, threads)
    record, source, device = artifact.record, artifact.source, artifact.device
    # The PyTorch reference runs in the file's own precision (an engine's: its ONNX file's).
    model = sources.build_model(source, record["schedule"], record.get("dtype", "fp32"))
    cfg = model.config
    if data_dir is not None or has_bundled_data(source.model):
        batches = folder_images(data_dir, source.model, cfg, samples)
    else:
        batches = random_images(cfg, samples or DEFAULT_SAMPLES, seed)
    batch = artifact.batch_for(batch, len(batches))
    memory.check_forward(cfg, batch, device, "`batch`", source.model)

    layers = model.token_merge.layers if hasattr(model, "token_merge") else []
    traced = (artifact.proto is not None and bool(layers)
              and len(custom_nodes(artifact.proto, MERGE_OP)) == len(layers))
    # Traced: the same file, with each merge node's decision as an extra output.
    runner = artifact.runner(decisions.with_decision_outputs(artifact.proto, layers) if traced else None,
                             reference=True)
    outputs = run(runner, batches, batch, progress)
    reference = run(TorchRunner(model, device, threads, trace_merges=traced), batches, batch, progress)
    flips = decisions.compare_decisions(outputs, reference, layers if traced else [])
    near_ties = None
    if traced:
        near_ties = np.zeros(len(batches), bool)
        for i in np.flatnonzero(flips["flipped"]):
            near_ties[i] = decisions.near_tie(model, batches.read(i, i + 1)[0], int(flips["first_step"][i]),
                                              noise=near_tie_noise(artifact.precision))
    report = {
        "artifact": str(artifact.path),
        "runtime": "onnx.reference" if artifact.onnxruntime_lacks_dtype else artifact.runtime,
        "precision": artifact.precision,
        **({key: artifact.engine[key] for key in ("tensorrt", "gpu")} if artifact.engine else {}),
        "model": source.model,
        "method": source.method,
        "ratio": source.ratio,
        "schedule_spec": source.schedule_spec,
        "tokens_per_layer": record["tokens_per_layer"],
        "scan": record["scan"],
        "batch": batch,
        "device": device,
        "data": batches.name,
        "decisions": {k: v for k, v in flips.items() if k not in ("flipped", "first_step")},
        **compare(outputs[OUTPUT_NAME], reference[OUTPUT_NAME], batches.labels, flips["flipped"], near_ties),
    }
    report["passed"] = passed(report, artifact.precision)
    report["tolerance"] = REDUCED_PRECISION_TOLERANCE.get(artifact.precision, {"max_rel_err": REL_TOLERANCE})
    return report
