"""pyproject.toml lists every Python package of the source tree (a wheel ships only those)."""

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
