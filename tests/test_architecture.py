"""The architecture of docs/ARCHITECTURE.md holds: imports point one way, only the transport's adapter reaches
hivemind's P2P, every error derives from SwarmError, and no module passes 400 lines. Reads the sources (ast)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

import pytest

import swarmlm
import swarmlm.errors

ROOT = Path(swarmlm.__file__).parent
MAX_LINES = 400

# part -> the parts it may import (besides itself); a part is a subpackage or a top-level module
BASE = {"errors", "settings", "utils", "__init__"}
ALLOWED = {
    "errors": set(), "settings": set(), "utils": {"errors"}, "__init__": {"client"},  # lazy: the public class
    "models": BASE, "experts": BASE | {"models"},
    "dht": BASE | {"experts", "models"}, "transport": BASE,
    "monitoring": BASE | {"dht", "experts", "models"},
    "client": BASE | {"dht", "experts", "models", "transport", "monitoring"},
    "peer": BASE | {"dht", "experts", "models", "transport", "monitoring"},
    "training": BASE | {"dht", "experts", "models", "transport", "monitoring", "client", "peer"},
}
TOP = {"cli", "demo", "local_swarm"}  # may import anything


def _modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported swarmlm module) of every import in the file, wherever it is (functions, TYPE_CHECKING)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("swarmlm")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("swarmlm"):
            if node.module == "swarmlm":  # a subpackage or module, else a name of swarmlm/__init__.py
                found += [(node.lineno, f"swarmlm.{a.name}" if (ROOT / a.name).is_dir() or (ROOT / f"{a.name}.py").is_file()
                           else "swarmlm") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def test_imports_point_one_way():
    wrong = []
    for path in _modules():
        part = _part(path)
        if part in TOP:
            continue
        allowed = ALLOWED.get(part)
        if allowed is None:
            wrong.append(f"{path.relative_to(ROOT)}: part {part!r} is not in the architecture")
            continue
        for line, module in _imports(path):
            target = module.split(".")[1] if "." in module else "__init__"
            if target != part and target not in allowed:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({part} -> {target})")
    assert wrong == [], "\n".join(wrong)


def test_only_the_transport_adapter_reaches_hivemind_p2p():
    users = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.startswith("hivemind.p2p") for name in names):
                users.append(str(path.relative_to(ROOT)))
    assert set(users) <= {"transport/p2p.py", "transport/channel.py", "transport/server.py"}, users
    assert "_get_handle_name" not in "".join(p.read_text() for p in (ROOT / "transport").glob("*.py"))


def test_every_error_class_is_in_the_one_tree():
    """Every exception class swarmlm defines lives in swarmlm/errors.py and derives from SwarmError."""
    for info in pkgutil.walk_packages(swarmlm.__path__, "swarmlm."):
        importlib.import_module(info.name)
    defined = [cls for module in list(sys.modules.values()) if (getattr(module, "__name__", "") or "").startswith("swarmlm")
               for _, cls in inspect.getmembers(module, inspect.isclass)
               if issubclass(cls, BaseException) and cls.__module__.startswith("swarmlm")]
    assert defined
    outside = {f"{cls.__module__}.{cls.__qualname__}" for cls in defined
               if cls.__module__ != "swarmlm.errors" or not issubclass(cls, swarmlm.errors.SwarmError)}
    assert outside == set(), outside


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_passes_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by job"
