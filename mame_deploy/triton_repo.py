"""A standard Triton Inference Server model repository from an export (``export --triton-repo``).

For a full Triton installation (``tritonserver --model-repository DIR``), no Python involved::

    DIR/NAME/config.pbtxt            onnxruntime backend
    DIR/NAME/1/model.onnx            the exported file as is: it carries its ONNX function bodies
    DIR/NAME/manifest.json, README.md   the manifest; how to start Triton, notes
    DIR/NAME_trt/config.pbtxt        tensorrt backend, where an engine was built (NAME.plan)
    DIR/NAME_trt/1/model.plan
    DIR/NAME_trt/manifest.json, README.md

``config.pbtxt`` gives the input and output (dims without the batch axis), ``max_batch_size``,
dynamic batching and the manifest as ``mame.*`` parameters. Triton's own backends cannot pad a
batch, so a static-batch file gets ``max_batch_size: 0``, its full shape as dims, and no dynamic
batching (``mame-deploy serve`` pads instead; or export with ``--dynamic-batch``). Every config
is parsed back with tritonclient's ``model_config_pb2`` before anything is written.

``model_name`` and ``manifest_parameters`` are also what ``mame-deploy serve`` names and
describes its models with.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from mame_deploy import artifacts
from mame_deploy import source as sources
from mame_deploy.errors import UserError

DEFAULT_MAX_BATCH = 32           # for files with a dynamic batch axis
DEFAULT_QUEUE_DELAY_US = 2000    # how long the batcher may hold a request to fill a batch
VERSION = 1                      # the model version folder
CLIENT_HINT = "pip install 'mame-deploy[serve]'"


# ---------------------------------------------------------------------------------------------
# Names and parameters (shared with mame_deploy.serve)


def model_name(record: dict) -> str:
    """``vim_s`` unmerged, ``vim_s_mame_r0.5`` merged by ratio, ``vim_s_tome_s1a2b3c4d`` by an
    explicit schedule (a hash of it: Triton names allow only letters, digits, ``._-``). Works on
    a manifest and on a ``Source.as_dict()`` alike."""
    base = record["model"]
    spec = record.get("schedule_spec")
    if spec:
        return f"{base}_{record['method']}_s{hashlib.sha256(spec.encode()).hexdigest()[:8]}"
    if record.get("ratio"):
        return f"{base}_{record['method']}_r{float(record['ratio']):g}"
    return base


def check_name(name: Optional[str]) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name or ""):
        raise UserError(f"model name {name!r} is not valid for Triton; use letters, digits, '.', '_' and '-'")
    return name


def manifest_parameters(record: dict) -> dict[str, str]:
    """Every manifest entry as a Triton config parameter ``mame.KEY`` (strings as they are,
    anything else as JSON): what ``GET /v2/models/NAME/config`` shows of the model."""
    return {f"mame.{key}": value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            for key, value in sorted(record.items())}


# ---------------------------------------------------------------------------------------------
# config.pbtxt


class Enum(str):
    """A protobuf enum value: written bare (TYPE_FP32), not quoted."""


def _quote(text: str) -> str:
    """A protobuf text-format string: printable ASCII as is, every other byte octal-escaped
    (valid for Triton's C++ parser and Python's alike)."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        out.append(char if 32 <= byte < 127 and char not in '"\\' else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _scalar(value) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _quote(value)
    raise TypeError(f"no text format for {value!r}")


def to_pbtxt(fields: list, indent: int = 0) -> str:
    """Protobuf text format of ``[(name, value), ...]``; a value is a scalar, a list of scalars
    (``[a, b]``), or a nested field list (``name { ... }``). Repeat a name for repeated messages."""
    pad = "  " * indent
    lines = []
    for name, value in fields:
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            lines.append(f"{pad}{name} {{")
            lines.append(to_pbtxt(value, indent + 1))
            lines.append(f"{pad}}}")
        elif isinstance(value, list):
            lines.append(f"{pad}{name}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{name}: {_scalar(value)}")
    return "\n".join(lines)


@dataclass(frozen=True)
class ModelEntry:
    """One model of the repository, before anything is written."""

    name: str
    platform: str                 # onnxruntime_onnx or tensorrt_plan
    artifact: Path                # the file copied to NAME/1/model.<ext>
    record: dict                  # its manifest
    max_batch: int                # 0: no Triton batching (static-batch file)
    dims: tuple                   # input dims without the batch axis (with it when max_batch is 0)
    num_classes: int
    preferred: tuple = ()
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    notes: tuple = field(default_factory=tuple)

    @property
    def filename(self) -> str:
        return "model.onnx" if self.platform == "onnxruntime_onnx" else "model.plan"

    def config_text(self) -> str:
        out_dims = [self.num_classes] if self.max_batch else [self.dims[0], self.num_classes]
        fields = [
            ("name", self.name),
            ("platform", self.platform),
            ("max_batch_size", self.max_batch),
            ("input", [("name", self.record.get("input_name", "images")), ("data_type", Enum("TYPE_FP32")),
                       ("dims", list(self.dims))]),
            ("output", [("name", self.record.get("output_name", "logits")), ("data_type", Enum("TYPE_FP32")),
                        ("dims", out_dims)]),
        ]
        if self.max_batch:
            batching = [("max_queue_delay_microseconds", self.queue_delay_us)]
            if self.preferred:
                batching.insert(0, ("preferred_batch_size", list(self.preferred)))
            fields.append(("dynamic_batching", batching))
        fields.append(("default_model_filename", self.filename))
        for key, value in manifest_parameters(self.record).items():
            fields.append(("parameters", [("key", key), ("value", [("string_value", value)])]))
        header = f"# Written by mame-deploy from {self.artifact.name}; see README.md beside it\n"
        return header + to_pbtxt(fields) + "\n"


def parse_config(text: str):
    """``text`` parsed into tritonclient's ``ModelConfig`` protobuf (the message Triton reads)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise UserError(f"checking a Triton model config needs tritonclient; {CLIENT_HINT}") from None
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise UserError(f"the Triton model config did not parse: {exc}") from None
    return config


def check_config(entry: ModelEntry, text: str) -> None:
    """Parse ``text`` and compare what Triton will read with what ``entry`` means."""
    config = parse_config(text)
    problems = []
    if config.name != entry.name or config.platform != entry.platform:
        problems.append(f"name/platform {config.name}/{config.platform}")
    if config.max_batch_size != entry.max_batch:
        problems.append(f"max_batch_size {config.max_batch_size}")
    if len(config.input) != 1 or tuple(config.input[0].dims) != tuple(entry.dims):
        problems.append("input dims")
    if bool(entry.max_batch) != config.HasField("dynamic_batching"):
        problems.append("dynamic batching")
    if dict((k, v.string_value) for k, v in config.parameters.items()) != manifest_parameters(entry.record):
        problems.append("parameters")
    if problems:
        raise UserError(f"the Triton config of {entry.name} does not read back as written ({', '.join(problems)})")


# ---------------------------------------------------------------------------------------------
# Entries from an export


def onnx_entry(onnx_path: Path, record: dict, max_batch: Optional[int] = None,
               queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, name: Optional[str] = None) -> ModelEntry:
    channels, height, width = record["input_shape"][1:]
    batch = record["batch"]
    notes = []
    if batch is None:
        top = DEFAULT_MAX_BATCH if max_batch is None else max_batch
        if top < 1:
            raise UserError(f"`max_batch` must be at least 1, got {top}")
        max_b, dims, preferred = top, (channels, height, width), ()
    else:
        max_b, dims, preferred = 0, (batch, channels, height, width), ()
        notes.append(f"{onnx_path.name} has a static batch of {batch}: Triton's onnxruntime backend cannot "
                     "pad, so it is served without dynamic batching and every request must carry exactly "
                     f"{batch} images (export with --dynamic-batch for dynamic batching)")
    return ModelEntry(check_name(name or model_name(record)), "onnxruntime_onnx", onnx_path, record, max_b, dims,
                      int(record["num_classes"]), preferred, queue_delay_us, tuple(notes))


def engine_entry(plan: Path, record: dict, name: str, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> ModelEntry:
    engine = record["engine"]
    channels, height, width = record["input_shape"][1:]
    batch = engine["batch"]
    notes = [
        f"{plan.name} is a TensorRT {engine['tensorrt']} engine for {engine.get('gpu', 'its GPU')} "
        f"({engine['precision']}): use a Triton release built with that TensorRT version, on that GPU model.",
        f"Its {engine['plugin']['nodes']} {engine['plugin']['id']} nodes run the plugin's ahead-of-time "
        f"({engine['plugin']['implementation']}) kernel, whose PTX is inside the engine. The plugin is "
        "registered from Python (tensorrt.plugin), not from a shared library, so there is nothing to "
        "LD_PRELOAD or pass as --backend-config=tensorrt,plugins=...; whether Triton's C++ TensorRT "
        "backend deserialises such an engine without the Python registration is unverified here (no "
        "TensorRT). If it reports that no creator was found for the plugin, serve the engine with "
        "`mame-deploy serve` instead, which registers the plugin before loading it.",
    ]
    if engine["plugin"]["implementation"] == "jit":
        notes.append(f"{plan.name} was built with --jit: it calls back into Python and cannot run in "
                     "Triton's TensorRT backend; rebuild it without --jit")
    if isinstance(batch, int):
        max_b, dims, preferred = 0, (batch, channels, height, width), ()
    else:
        max_b, dims, preferred = int(batch["max"]), (channels, height, width), (int(batch["opt"]),)
    return ModelEntry(check_name(name), "tensorrt_plan", plan, record, max_b, dims, int(record["num_classes"]),
                      preferred, queue_delay_us, tuple(notes))


def export_entries(onnx_path: Union[str, Path], max_batch: Optional[int] = None,
                   queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> list[ModelEntry]:
    """The ONNX model of an export and, when its manifest records an engine beside it, the engine."""
    onnx_path = Path(onnx_path)
    record = sources.read_manifest(onnx_path, artifacts.file_sha256(onnx_path))
    entries = [onnx_entry(onnx_path, record, max_batch, queue_delay_us)]
    plan = onnx_path.with_suffix(".plan")
    if plan.is_file() and isinstance(record.get("engine"), dict):
        from mame_deploy.engine import read_engine_manifest

        entries.append(engine_entry(plan, read_engine_manifest(plan), entries[0].name + "_trt", queue_delay_us))
    return entries


# ---------------------------------------------------------------------------------------------
# Writing


def repository_paths(repo: Path, entry: ModelEntry) -> dict[str, Path]:
    folder = repo / entry.name
    return {"config": folder / "config.pbtxt", "model": folder / str(VERSION) / entry.filename,
            "manifest": folder / "manifest.json", "readme": folder / "README.md"}


def check_repository(repo: Union[str, Path], names: list[str], force: bool) -> None:
    """Fail before any work if ``repo`` is a file or already holds one of these models."""
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise UserError(f"`triton_repo` {repo} is a file; pass a folder for the model repository")
    existing = [str(repo / n) for n in names if (repo / n).exists()]
    if existing and not force:
        raise UserError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''} in the model "
                        "repository; pass `force` to overwrite, or choose another `triton_repo`")


def readme(repo: Path, entry: ModelEntry) -> str:
    batching = (f"max batch {entry.max_batch}, dynamic batching" if entry.max_batch
                else f"fixed input {list(entry.dims)}, no batching")
    lines = [
        f"# {entry.name} (written by mame-deploy from {entry.artifact.name})",
        "",
        f"{entry.platform}, {batching}. The manifest is in `manifest.json` and, as `mame.*` parameters, in",
        "`config.pbtxt` (`GET /v2/models/NAME/config` shows them). Start a full Triton Inference Server on the",
        "repository (loopback addresses; add ports as needed):",
        "",
        f"    tritonserver --model-repository={repo.resolve()} --http-address=127.0.0.1 --grpc-address=127.0.0.1",
    ]
    if entry.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in entry.notes]
    return "\n".join(lines) + "\n"


def write_repository(onnx_path: Union[str, Path], repo: Union[str, Path], force: bool = False,
                     max_batch: Optional[int] = None,
                     queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> list[ModelEntry]:
    """Write the repository for the export ``onnx_path`` (and its engine, if built) into ``repo``.
    Every config is checked by parsing before the first file is written."""
    repo = Path(repo)
    entries = export_entries(onnx_path, max_batch, queue_delay_us)
    check_repository(repo, [e.name for e in entries], force)
    texts = {}
    for entry in entries:
        texts[entry.name] = entry.config_text()
        check_config(entry, texts[entry.name])
    for entry in entries:
        paths = repository_paths(repo, entry)
        artifacts.write_bytes(paths["model"], entry.artifact.read_bytes())
        artifacts.write_json(paths["manifest"], entry.record)
        artifacts.write_bytes(paths["readme"], readme(repo, entry).encode())
        artifacts.write_bytes(paths["config"], texts[entry.name].encode())
    return entries
