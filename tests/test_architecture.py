"""The layout's rules, read from the source: the training core never imports a trainer, and model
code never asks which backend it runs on (kernels are module fields chosen by the caller)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxvision"


def _sources(folder: str) -> list[Path]:
    files = sorted((PACKAGE / folder).rglob("*.py"))
    assert files, f"no sources under jaxvision/{folder}"
    return files


def _imported_modules(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_the_training_core_never_imports_a_trainer():
    """Every import in `jaxvision/train/**`, at any depth, is checked: none reaches `jaxvision.trainers`
    (the trainers build on the core; the core stays usable without them)."""
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in _sources("train")
        for name in _imported_modules(ast.parse(path.read_text()))
        if name == "jaxvision.trainers" or name.startswith("jaxvision.trainers.")
    ]
    assert not offenders, offenders


def test_the_import_check_sees_function_level_imports():
    """The checker itself: an import inside a function body is found (so the test above can fail)."""
    tree = ast.parse("def f():\n    from jaxvision.trainers import dreambooth\n")
    assert "jaxvision.trainers.dreambooth" in _imported_modules(tree)


def _host_probes(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("default_backend", "ContextVar"):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in ("default_backend", "ContextVar"):
            found.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if "contextvars" in modules:
                found.append(f"line {node.lineno}: imports contextvars")
    return found


def test_model_code_never_probes_the_host():
    """No file under `jaxvision/models/` calls `jax.default_backend` or reads a context variable:
    a model is a pure function of its fields (`attention_impl`, `conv_impl`)."""
    offenders = {
        str(path.relative_to(PACKAGE.parent)): probes
        for path in _sources("models")
        if (probes := _host_probes(ast.parse(path.read_text())))
    }
    assert not offenders, offenders


def test_the_probe_check_sees_both_forms():
    """The checker itself finds `jax.default_backend()` and a `ContextVar`."""
    code = "import contextvars, jax\nV = contextvars.ContextVar('v')\nif jax.default_backend() == 'cpu':\n    pass\n"
    assert len(_host_probes(ast.parse(code))) == 3
