"""Imports made inside functions run only when that function does, so a name removed from a module can hide
there until a user reaches it (doctor's `load_gguf_model` did). This reads every function body of our
packages and checks that each `from .x import y` / `from mlx_spec.x import y` names something that exists."""

import ast
import importlib
import importlib.util

import pytest
from conftest import ROOT

PACKAGES = ("mlx_spec", "convert")


def _module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path) -> bool:
    return path.name == "__init__.py"


def function_local_imports():
    """(where, module imported from, name) for every `from ... import name` inside a function body of ours."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = _module_name(path)
            anchor = module if _is_package(path) else module.rpartition(".")[0]
            tree = ast.parse(path.read_text(), filename=str(path))
            for func in ast.walk(tree):
                if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(func):
                    if isinstance(node, ast.ImportFrom):
                        target = importlib.util.resolve_name("." * node.level + (node.module or ""), anchor) \
                            if node.level else node.module
                        if target.split(".")[0] in PACKAGES:
                            found += [(f"{module}:{node.lineno}", target, a.name) for a in node.names]
                    elif isinstance(node, ast.Import):
                        found += [(f"{module}:{node.lineno}", a.name, None) for a in node.names
                                  if a.name.split(".")[0] in PACKAGES]
    return sorted(set(found))


IMPORTS = function_local_imports()


def test_the_scan_sees_the_lazy_imports():
    assert len(IMPORTS) > 20, "the scan must find the packages' function-local imports (is the AST walk broken?)"
    assert any(target == "mlx_spec.gguf" for _, target, _ in IMPORTS), "doctor's and api's GGUF imports are lazy"


@pytest.mark.parametrize("where,target,name", IMPORTS, ids=[f"{w}:{t}.{n or ''}" for w, t, n in IMPORTS])
def test_every_function_local_import_resolves(where, target, name):
    module = importlib.import_module(target)
    if name is None or name == "*" or hasattr(module, name):
        return
    try:  # `from package import submodule`
        importlib.import_module(f"{target}.{name}")
    except ModuleNotFoundError:
        pytest.fail(f"{where} imports {name!r} from {target}, which has no such name: a dead import that fails only "
                    "when that code runs")
