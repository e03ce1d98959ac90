"""The CLI skeleton: version, models, info, and one-line errors with exit code 2."""

import subprocess
import sys

import torch

import mame_deploy
from mame_deploy.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and mame_deploy.__version__ in out


def test_models_table(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    for name, params in (("vim_t", "7,148,008"), ("vim_s", "25,796,584"), ("vim_b", "97,598,440")):
        assert name in out and params in out


def test_info(capsys):
    code, out, _ = run(capsys, "info", "vim_s")
    assert code == 0 and "25,796,584" in out and "196 patches" in out
    assert "5.2" in out  # GFLOPs (multiply-adds), the paper reports 5.1 for Vim-S


def test_unknown_model_is_one_line(capsys):
    code, out, err = run(capsys, "info", "vim_xl")
    assert code == 2 and "unknown model 'vim_xl'" in err and "vim_t" in err
    assert "Traceback" not in err + out


def test_bad_checkpoint_is_one_line(capsys, tmp_path):
    bad = tmp_path / "other.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, bad)
    code, _, err = run(capsys, "info", "vim_t", "--checkpoint", str(bad))
    assert code == 2 and "does not fit vim_t" in err and "Traceback" not in err


def test_console_script_exits_nonzero_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from mame_deploy.cli.main import main; sys.exit(main())", "info", "nope"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "unknown model" in proc.stderr and "Traceback" not in proc.stderr
