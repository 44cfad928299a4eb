"""Imports go one way (README, Layout): groupemotion_core <- ray_jobs' stages <- the commands <- the
CLI; no command imports another, and a sink imports no stage. Read from the source with `ast`, lazy
imports inside functions included, so a shortcut across the layers fails here, with its place."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND_HELPERS = {"ray_jobs.commands.args"}  # shared by the commands; not a job


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _crossings(package: str, refused) -> list[str]:
    return [f"{_module(path)}:{line} imports {name}"
            for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py"))
            for line, name in _imports(path) if refused(_module(path), name)]


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package, refused", [
    ("groupemotion_core", lambda module, name: _under(name, "ray", "ray_jobs", "boto3", "botocore", "s3fs")),
    ("ray_jobs", lambda module, name: not _under(module, "ray_jobs.commands", "ray_jobs.cli")
        and _under(name, "ray_jobs.commands", "ray_jobs.cli")),
    ("ray_jobs.commands", lambda module, name: _under(name, "ray_jobs.commands")
        and not _under(name, *COMMAND_HELPERS) and not name.startswith(module + ".")),
    ("ray_jobs.sinks", lambda module, name: _under(name, "ray_jobs.predict", "ray_jobs.decode", "ray_jobs.train")),
    ("ray_jobs.decode", lambda module, name: _under(name, "ray_jobs.decode.child") and module != "ray_jobs.decode.child"),
], ids=["core-imports-no-ray", "stages-import-no-command", "no-command-imports-a-command",
        "sinks-import-no-stage", "nothing-imports-the-decode-child"])
def test_imports_go_one_way(package, refused):
    assert _crossings(package, refused) == []
