"""Atomic artifact writes, --force handling and manifest reading (no model export needed)."""

from __future__ import annotations

import json
import os

import pytest

from mame_deploy import artifacts, onnx_export
from mame_deploy.errors import UserError
from mame_deploy.manifest import REQUIRED_KEYS, Source, source_from_manifest
from mame_deploy.source import build_model, read_manifest


def test_write_bytes_replaces_atomically(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    artifacts.write_bytes(path, b"one")
    artifacts.write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.bin"]  # no temporary left behind


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    artifacts.write_json(path, {"v": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(UserError, match="could not write .*a.json .disk full.; nothing was written"):
        artifacts.write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_json_is_canonical(tmp_path):
    artifacts.write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    artifacts.write_json(tmp_path / "b.json", {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_check_writable(tmp_path):
    free, taken = tmp_path / "free.onnx", tmp_path / "taken.json"
    taken.write_text("{}")
    artifacts.check_writable([free], force=False)
    artifacts.check_writable([free, taken], force=True)
    with pytest.raises(UserError, match="taken.json already exists; pass `force`"):
        artifacts.check_writable([free, taken], force=False)
    with pytest.raises(UserError, match="is a directory"):
        artifacts.check_writable([tmp_path], force=True)


def test_a_failed_export_writes_nothing(tmp_path, monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_export, "to_onnx", broken_export)
    with pytest.raises(RuntimeError):
        onnx_export.export(Source("vim_t", overrides={"depth": 1}), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_manifest_round_trip_rebuilds_the_same_source(tmp_path):
    source = Source("vim_t", seed=4, overrides={"depth": 1, "img_size": 32, "patch_size": 8, "embed_dim": 32})
    result = onnx_export.export(source, tmp_path / "m.onnx", batch=None)
    record = read_manifest(result.onnx_path, artifacts.file_sha256(result.onnx_path))
    assert set(REQUIRED_KEYS) <= set(record) and record["batch"] is None and record["dynamic_batch"]
    assert record["input_shape"] == ["batch", 3, 32, 32]
    rebuilt = source_from_manifest(record)
    assert (rebuilt.model, rebuilt.seed, rebuilt.overrides) == ("vim_t", 4, source.overrides)
    original, again = build_model(source), build_model(rebuilt, record["schedule"])
    for (name, a), b in zip(original.state_dict().items(), again.state_dict().values()):
        assert (a == b).all(), name
    with pytest.raises(UserError, match="merge schedule"):
        build_model(rebuilt, [1] + record["schedule"][1:])
