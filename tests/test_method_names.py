"""No code outside methods/ knows a method by name: behaviour comes from the facts a Method declares.

Outside src/prefixtune/methods/ a method name may appear only as data: the experiment catalogues
(experiments/catalogue.py; in experiments/vision/ its registry, vpt.py and l2p.py), which say which arms
the paper's experiments compare, and docstrings. No module compares anything with a method name (`== "adapter"`, `in ("prefix", "infix")`,
`match` cases), which is how per-method behaviour crept into recipes and experiments before.
"prefix" and "prompt" are also the domain's words (the server's objects, the prompt text), so only the
comparison rule applies to them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from prefixtune.methods import METHODS

SRC = Path(__file__).resolve().parents[1] / "src" / "prefixtune"
CATALOGUES = {"experiments/catalogue.py", "experiments/vision/__init__.py", "experiments/vision/vpt.py",
              "experiments/vision/l2p.py"}
DOMAIN_WORDS = {"prefix", "prompt"}


def _strings_compared(tree: ast.AST, names: set[str]):
    """(line, name) of every method-name constant that a comparison or a match case tests against."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                for c in ast.walk(operand):
                    if isinstance(c, ast.Constant) and c.value in names:
                        yield c.lineno, c.value
        elif isinstance(node, ast.match_case):
            for c in ast.walk(node.pattern):
                if isinstance(c, ast.Constant) and c.value in names:
                    yield c.lineno, c.value


def _string_constants(tree: ast.AST, names: set[str]):
    """(line, name) of every method-name string constant that is not a docstring."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for c in ast.walk(tree):
        if isinstance(c, ast.Constant) and c.value in names and id(c) not in docstrings:
            yield c.lineno, c.value


def _modules():
    return sorted(p for p in SRC.rglob("*.py") if "methods" not in p.relative_to(SRC).parts)


def test_no_module_outside_methods_branches_on_a_method_name():
    names = set(METHODS)
    found = [f"{p.relative_to(SRC)}:{line}: {name!r}" for p in _modules()
             for line, name in _strings_compared(ast.parse(p.read_text()), names)]
    assert not found, "code outside methods/ tests for a method by name (ask the Method's facts instead):\n" + \
        "\n".join(found)


def test_method_names_outside_methods_are_only_the_catalogues_data():
    names = set(METHODS) - DOMAIN_WORDS
    found = [f"{p.relative_to(SRC)}:{line}: {name!r}" for p in _modules()
             if str(p.relative_to(SRC)) not in CATALOGUES
             for line, name in _string_constants(ast.parse(p.read_text()), names)]
    assert not found, "a method named outside methods/ and the experiment catalogues:\n" + "\n".join(found)


@pytest.mark.parametrize("code,rule", [
    ("def f(m):\n    return m == 'adapter'\n", _strings_compared),
    ("def f(m):\n    if m in ('lora', 'x'):\n        pass\n", _strings_compared),
    ("def f(m):\n    match m:\n        case 'ia3':\n            pass\n", _strings_compared),
    ("DEFAULT = 'lora'\n", _string_constants),
])
def test_the_rules_catch_a_method_name(code, rule):
    assert list(rule(ast.parse(code), set(METHODS)))


def test_docstrings_may_name_methods():
    assert not list(_string_constants(ast.parse('"""lora"""\ndef f():\n    """adapter"""\n'), set(METHODS)))
