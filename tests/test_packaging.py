"""pyproject.toml lists every Python package of the source tree (a wheel ships only those), and
every Python file of the repository compiles (benchmarks and tools that no CPU test imports too)."""

import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    for name, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            package = ".".join([name, *relative.parts])
            assert package in listed, f"{package} ({init.parent}) is missing from pyproject's packages"


def test_every_python_file_compiles():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    broken = []
    for name in files.stdout.split():
        try:
            compile((ROOT / name).read_text(), name, "exec")
        except SyntaxError as exc:
            broken.append(f"{name}:{exc.lineno}: {exc.msg}")
    assert not broken, "files that do not compile: " + "; ".join(broken)
