"""The bundled vim_digits model, its data, the training recipe, and the eval/sweep/train CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mame_deploy.cli.main import main
from mame_deploy.data import (
    DIGITS_SUBSETS, dataset_for, digits_dataset, digits_indices, digits_raw, image_folder, imagenet_preprocess,
)
from mame_deploy.errors import UserError
from mame_deploy.evaluate import evaluate
from mame_deploy.models import create_model, get_spec, read_state_dict
from mame_deploy.models.digits import WEIGHTS
from mame_deploy.train import Recipe, train_digits


@pytest.fixture(autouse=True)
def _one_thread(_deterministic_threads):
    # These tests run whole models through the reference scan, a loop of small ops. One thread
    # is about as fast there, and it does not slow down 10-20x when another process is using
    # the second core (measured: 449 test images in 5.5 s vs 99.5 s with 2 threads).
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def digits_model():
    return create_model("vim_digits")


@pytest.fixture(scope="module")
def test_split():
    return digits_dataset("test", 32)


def test_split_is_fixed_and_disjoint():
    parts = {s: set(digits_indices(s, 1797).tolist()) for s in DIGITS_SUBSETS}
    assert [len(parts[s]) for s in DIGITS_SUBSETS] == [1123, 225, 449]
    assert set.union(*parts.values()) == set(range(1797))
    assert not parts["train"] & parts["test"] and not parts["train"] & parts["val"] and not parts["val"] & parts["test"]
    assert min(parts["test"]) == 3 and all(i % 4 == 3 for i in parts["test"])
    with pytest.raises(UserError, match="unknown digits subset"):
        digits_indices("holdout", 1797)


def test_bundled_weights_load_by_default(digits_model):
    spec = get_spec("vim_digits")
    assert spec.bundled_checkpoint == WEIGHTS and WEIGHTS.is_file()
    assert WEIGHTS.stat().st_size < 4_000_000  # "a few MB at most"
    cfg = digits_model.config
    assert cfg.num_patches >= 64 and cfg.depth >= 8
    state = read_state_dict(WEIGHTS)
    assert all(torch.equal(v, state[k]) for k, v in digits_model.state_dict().items())


def test_held_out_accuracy_without_merging(digits_model, test_split):
    correct, total = evaluate(digits_model, test_split, batch_size=64)
    assert total == 449
    assert correct / total >= 0.97


def test_order_preserving_merging_beats_tome_on_real_images(test_split):
    """The issue's central claim, on 128 test images at half the tokens: MaMe keeps the scan
    order and loses far less than ToMe's concatenated arrangement."""
    import mame_deploy

    model = create_model("vim_digits")
    accuracy = {}
    for method in ("mame", "tome"):
        mame_deploy.patch(model, ratio=0.5, method=method)
        correct, total = evaluate(model, test_split, batch_size=64, limit=128)
        accuracy[method] = correct / total
    assert accuracy["mame"] > accuracy["tome"] + 0.2, accuracy


def test_image_folder_path_gives_the_same_predictions(tmp_path, digits_model):
    grey, labels = digits_raw("test")
    grey, labels = grey[:40], labels[:40]
    for k, (g, label) in enumerate(zip(grey, labels)):
        (tmp_path / str(label)).mkdir(exist_ok=True)
        Image.fromarray(np.round(g * 255).astype(np.uint8)).save(tmp_path / str(label) / f"{k:03d}.png")
    folder = dataset_for("vim_digits", digits_model.config, data=tmp_path)
    assert len(folder) == 40 and sorted(l for _, l in folder.samples) == sorted(labels.tolist())
    bundled = digits_dataset("test", 32)
    with torch.no_grad():
        x_folder, y_folder = next(folder.batches(40))
        order = [int(p.stem) for p, _ in folder.samples]
        x_bundled = bundled.images[order]
        assert torch.equal(y_folder, bundled.labels[order])
        # PNG stores 8-bit grey levels: inputs agree to quantisation, predictions exactly.
        assert (x_folder - x_bundled).abs().max() < 0.01
        assert torch.equal(digits_model(x_folder).argmax(-1), digits_model(x_bundled).argmax(-1))


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        image_folder(tmp_path / "missing", 10, "digits", 32)
    with pytest.raises(UserError, match="has no class folders"):
        image_folder(tmp_path, 10, "digits", 32)
    (tmp_path / "n01440764").mkdir()
    with pytest.raises(UserError, match="1 class folders but the model has 10 classes"):
        image_folder(tmp_path, 10, "imagenet", 224)
    (tmp_path / "n01440764").rmdir()
    (tmp_path / "12").mkdir()
    with pytest.raises(UserError, match="class folder 12 but the model has 10 classes"):
        image_folder(tmp_path, 10, "digits", 32)
    (tmp_path / "12").rmdir()
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="holds no images"):
        image_folder(tmp_path, 10, "digits", 32)
    (tmp_path / "3" / "bad.png").write_text("not a png")
    folder = image_folder(tmp_path, 10, "digits", 32)
    with pytest.raises(UserError, match="cannot read image"):
        next(folder.batches(4))
    with pytest.raises(UserError, match="has no bundled data"):
        dataset_for("vim_t", create_model("vim_t", depth=1).config)


def test_imagenet_preprocessing():
    # A 300 x 400 constant image: short side to 256, centre crop 224, normalised per channel.
    image = Image.new("RGB", (400, 300), (255, 128, 0))
    x = imagenet_preprocess(image, 224)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    expected = (torch.tensor([255, 128, 0]) / 255.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    # The crop is centred: a stripe in the middle of a wide image survives, its edges do not.
    image = Image.new("RGB", (512, 256), (0, 0, 0))
    image.paste((255, 255, 255), (250, 0, 262, 256))
    x = imagenet_preprocess(image, 224)
    assert x[0, :, 112].mean() > 2.0 and x[0, :, 0].mean() < -2.0 and x[0, :, -1].mean() < -2.0


def test_training_is_deterministic_and_learns():
    recipe = Recipe(epochs=2, batch_size=16, lr=3e-3, seed=5)
    kw = dict(limit=32, depth=2, embed_dim=16, d_state=4)
    a, hist_a = train_digits(recipe, **kw)
    b, _ = train_digits(recipe, **kw)
    c, _ = train_digits(Recipe(epochs=2, batch_size=16, lr=3e-3, seed=6), **kw)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.head.weight, c.head.weight)
    assert hist_a[1].loss < hist_a[0].loss and [h.epoch for h in hist_a] == [1, 2]


# ---------------------------------------------------------------------------------------------
# CLI


def test_eval_and_sweep_commands(tmp_path, capsys):
    out = tmp_path / "e.json"
    assert main(["eval", "vim_digits", "--ratio", "0.5", "--method", "tome", "--limit", "50", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["method"] == "tome" and record["images"] == 50 and 0 <= record["accuracy"] <= 1
    assert len(record["schedule"]) == 8 and sum(record["schedule"]) == 32
    assert record["tokens_per_layer"][0] == 65 and record["relative_gflops"] < 1
    assert main(["eval", "vim_digits", "--limit", "8", "--json", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err

    sweep_json, plot = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["sweep", "vim_digits", "--ratios", "0,0.7", "--methods", "mame,prune", "--limit", "40",
                 "--json", str(sweep_json), "--plot", str(plot), "--subset", "val"]) == 0
    records = json.loads(sweep_json.read_text())
    assert [(r["method"], r["ratio"]) for r in records] == [("mame", 0.0), ("mame", 0.7), ("prune", 0.0), ("prune", 0.7)]
    assert {"method", "ratio", "accuracy", "tokens_per_layer", "relative_gflops"} <= set(records[0])
    assert records[0]["accuracy"] == records[2]["accuracy"]  # ratio 0 is the same model for every method
    assert records[0]["data"] == "digits/val"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "prune" in table and "0.7" in table


@pytest.mark.parametrize("args, message", [
    (["eval", "vim_digits", "--ratio", "0.99"], "--ratio must lie in [0, 0.95]"),
    (["eval", "vim_digits", "--schedule", "3:40"], "layer 3 removes 40 tokens but only 64 patches remain"),
    (["eval", "vim_digits", "--schedule", "4:5", "--ratio", "0.3"], "either --ratio or --schedule"),
    (["eval", "vim_digits", "--method", "evit"], "unknown merge method 'evit'"),
    (["eval", "vim_digits", "--option", "lam"], "--option expects KEY=VALUE"),
    (["eval", "vim_digits", "--option", "layers=[1]"], "give merge layers with --layers"),
    (["eval", "vim_digits", "--layers", "1,99", "--ratio", "0.3"], "merge layer 99 is out of range"),
    (["eval", "vim_digits", "--data", "/nonexistent/dir"], "is not a directory"),
    (["eval", "vim_digits", "--subset", "all"], "unknown digits subset 'all'"),
    (["sweep", "vim_digits", "--ratios", "0,x"], "malformed --ratios"),
    (["sweep", "vim_digits", "--methods", "mame,evit"], "unknown method(s) evit"),
    (["sweep", "vim_digits", "--plot", "out.jpg"], "must end in .png"),
    (["train", "vim_t"], "no training recipe for 'vim_t'"),
    (["train", "--epochs", "0"], "--epochs must be at least 1"),
])
def test_cli_errors_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err
