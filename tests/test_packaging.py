"""What `pip install` puts into site-packages: every package folder of the repo, and no generic
top-level `tools` (the folder is installed as `shim_tools`)."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed_and_tools_is_namespaced():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "shim").rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders | {"shim_tools"}
    assert setuptools["package-dir"] == {"shim_tools": "tools"}
    assert (REPO / "tools" / "__init__.py").is_file()


def test_the_installed_name_is_the_one_the_code_imports():
    import shim_tools.envelope

    assert Path(shim_tools.envelope.__file__).resolve() == REPO / "tools" / "envelope.py"
