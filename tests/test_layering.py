"""The tiers stay apart: the HTTP tier and the dispatcher share only goinfer.queue and the models.

Each tier runs on machines of its own and is deployed, restarted and scaled on its own, so
neither may depend on the other's code, and nothing else (the client, the tools, the
benchmarks, the examples) may reach into either. Only the entry points that start a tier may
import it. Every import counts, lazy ones inside functions included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("goinfer", "benchmarks", "examples")
TIERS = ("goinfer.http", "goinfer.dispatcher")
# Modules that start a tier (as a command or as a child process) and so may import one.
ENTRY_POINTS = {"goinfer.cli", "goinfer.up", "goinfer.testing"}
DYNAMIC_IMPORTERS = {"import_module", "__import__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything `module` imports, wherever the import statement is.

    `from a import b` yields `a.b` (b may be a submodule or a name), relative imports are resolved, and
    importlib.import_module / __import__ with a literal name count as imports too.
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                yield node.lineno, base if alias.name == "*" else f"{base}.{alias.name}"
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in DYNAMIC_IMPORTERS and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(module: str, imports: Iterator[tuple[int, str]]) -> list[str]:
    """What `module` imports that the layering forbids, one readable line each."""
    found = []
    for line, name in imports:
        for tier in TIERS:
            if not within(name, tier) or within(module, tier):
                continue
            other_tier = next((t for t in TIERS if t != tier and within(module, t)), None)
            if other_tier is None and module in ENTRY_POINTS:
                continue
            why = f"the tier {other_tier} never imports {tier}" if other_tier else \
                f"only the tier itself and {sorted(ENTRY_POINTS)} import {tier}"
            found.append(f"{module} (line {line}) imports {name}: {why}")
    return sorted(set(found))


def scanned_modules() -> list[tuple[str, Path]]:
    modules = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            modules.append((module_name(path), path))
    return modules


def test_tiers_import_only_the_shared_contract():
    modules = scanned_modules()
    assert any(name == "goinfer.http.app" for name, _ in modules)  # the walk finds the tiers at all
    assert any(name == "goinfer.dispatcher.worker" for name, _ in modules)
    problems = []
    for name, path in modules:
        imports = imported_modules(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
        problems += violations(name, imports)
    assert not problems, "imports across the tiers:\n" + "\n".join(problems)


@pytest.mark.parametrize("module, source, expected", [
    ("goinfer.client", "def f():\n    from goinfer.http.signing import go_sign_string\n",
     "goinfer.client (line 2) imports goinfer.http.signing"),
    ("goinfer.http.app", "from goinfer.dispatcher import worker\n",
     "goinfer.http.app (line 1) imports goinfer.dispatcher.worker: the tier goinfer.http never imports"),
    ("goinfer.dispatcher.worker", "from ..http import envelope\n",
     "goinfer.dispatcher.worker (line 1) imports goinfer.http"),
    ("benchmarks.run", "import goinfer.dispatcher.supervisor as s\n",
     "benchmarks.run (line 1) imports goinfer.dispatcher.supervisor"),
    ("examples.demo", "import importlib\nimportlib.import_module('goinfer.http.server')\n",
     "examples.demo (line 2) imports goinfer.http.server"),
    ("goinfer.up", "from goinfer.dispatcher.supervisor import run_dispatcher\n", None),
    ("goinfer.cli", "from goinfer import queue\nfrom goinfer.http.server import run_http\n", None),
    ("goinfer.tools", "from goinfer.queue import Job\nimport goinfer.httpx_like\n", None),
])
def test_the_walk_names_the_module_and_the_import(module, source, expected):
    found = violations(module, imported_modules(source, module))
    if expected is None:
        assert found == []
    else:
        assert any(line.startswith(expected) for line in found), found
