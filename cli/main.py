"""Entry point of ``mame-deploy``. Each subsystem adds its commands in a module of its own
(``cli/<subsystem>.py``) and registers them here; all of them report bad input as one line."""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import mame_deploy
from mame_deploy.cli.common import with_flags
from mame_deploy.errors import UserError

app = typer.Typer(
    name="mame-deploy",
    help="Token-merged Vision Mamba: patch, export to ONNX/TensorRT, validate and benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _version(value: bool):
    if value:
        console.print(f"mame-deploy {mame_deploy.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
):
    pass


@app.command("models")
def models_cmd():
    """List the models the toolkit knows."""
    from mame_deploy.models import create_model, get_spec, list_models

    table = Table(title="models")
    for col in ("name", "parameters", "tokens", "input", "weights"):
        table.add_column(col, justify="right" if col in ("parameters", "tokens") else "left")
    for name in list_models():
        spec = get_spec(name)
        cfg = spec.config
        params = sum(p.numel() for p in create_model(name).parameters())
        size = f"{cfg.in_chans}x{cfg.img_size}x{cfg.img_size}"
        table.add_row(name, f"{params:,}", str(cfg.num_patches + 1), size, spec.weights)
    console.print(table)


@app.command("info")
def info_cmd(
    model: str = typer.Argument(..., help="Model name (see `mame-deploy models`)."),
    checkpoint: Optional[str] = typer.Option(None, help="Checkpoint to load and check."),
):
    """Parameters, tokens and GFLOPs per image of one model."""
    from mame_deploy.flops import gflops
    from mame_deploy.models import create_model, get_spec

    spec = get_spec(model)
    net = create_model(model, checkpoint=checkpoint)
    cfg = spec.config
    table = Table(title=model, show_header=False)
    table.add_row("parameters", f"{sum(p.numel() for p in net.parameters()):,}")
    table.add_row("tokens", f"{cfg.num_patches} patches + 1 class token (at {cfg.cls_position})")
    table.add_row("input", f"(B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}) float32")
    table.add_row("blocks", f"{cfg.depth} x embed {cfg.embed_dim}, d_inner {cfg.d_inner}, d_state {cfg.d_state}")
    table.add_row("GFLOPs / image", f"{gflops(cfg):.3f} (multiply-adds)")
    table.add_row("weights", net.checkpoint_path or spec.weights)
    console.print(table)


from mame_deploy.cli import build  # noqa: E402

build.register(app)

from mame_deploy.cli import export  # noqa: E402

export.register(app)

from mame_deploy.cli import check  # noqa: E402

check.register(app)

from mame_deploy.cli import evaluate  # noqa: E402

evaluate.register(app)

from mame_deploy.cli import serve  # noqa: E402

serve.register(app)

from mame_deploy.cli import tune  # noqa: E402

tune.register(app)


@contextlib.contextmanager
def _interrupts_recorded(seen: list):
    """SIGTERM raises KeyboardInterrupt like Ctrl-C does, so every cleanup (temporaries, scratch
    folders) runs for both; ``seen`` records which signal came."""
    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI; a UserError becomes one line on stderr and exit code 2. Ctrl-C and SIGTERM
    stop it the same way, temporary files removed, with exit codes 130 and 143."""
    seen: list = []
    try:
        with _interrupts_recorded(seen):
            code = _run(argv)
    except KeyboardInterrupt:  # raised outside typer's own handling
        code = 130
    if code == 130:  # typer turns KeyboardInterrupt into exit code 130
        terminated = signal.SIGTERM in seen
        Console(stderr=True).print(f"aborted ({'SIGTERM' if terminated else 'interrupted'}); "
                                   "no partial output was left", highlight=False)
        return 143 if terminated else 130
    return code


def _run(argv: Optional[list[str]]) -> int:
    try:
        code = app(args=argv, standalone_mode=False)  # typer.Exit(n) inside a command returns n
        if isinstance(code, int):
            return code
    except UserError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(with_flags(str(exc)))}", highlight=False,
                                   soft_wrap=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return 130
    except Exception as exc:
        # Usage errors (click's ClickException, vendored by newer typer): print and exit.
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
