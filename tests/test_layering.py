"""The package's layering (issue 18): no import circle, function-local imports only with a reason, no
reaching into another module's private names, and `import prefixtune.cli` without torch.

The checks walk the source with `ast` (nothing here imports the modules it checks, except check 4, which
runs in a subprocess). Each check is also run on a small broken package written to tmp_path, so a check
that silently passes everything fails here.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

import prefixtune

PACKAGE_ROOT = Path(prefixtune.__file__).resolve().parent

# Modules importable without torch on purpose: `prefixtune --help` and the config dataclasses (start-up time).
TORCH_FREE = ["prefixtune.cli", "prefixtune.config", "prefixtune.serve.config", "prefixtune.files",
              "prefixtune.decode_config", "prefixtune.progress", "prefixtune.experiments.config",
              "prefixtune.methods.configs", "prefixtune.methods", "prefixtune.methods.registry"]


@dataclass(frozen=True)
class Import:
    module: str            # the importing module, e.g. "prefixtune.serve.app"
    path: Path
    node: ast.Import | ast.ImportFrom
    local: bool            # inside a function (at any depth)
    targets: tuple         # the package's own modules it imports


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports_in(tree: ast.AST):
    """(import node, inside a function?) for every import that runs, skipping `if TYPE_CHECKING:` blocks."""
    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:  # `else:` of TYPE_CHECKING runs
                    yield from visit_one(other, local)
                continue
            yield from visit_one(child, local)

    def visit_one(child, local):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local
        yield from visit(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    yield from visit(tree, False)


def walk_package(root: Path) -> tuple[dict[str, Path], list[Import]]:
    """The package under `root` (a folder with __init__.py): its modules, and every import in them."""
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    found = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, local in _imports_in(ast.parse(path.read_text(), str(path))):
            targets = set()
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                # `from pkg import submodule` imports the submodule; any other name comes from pkg itself
                for t in (subs if len(subs) == len(node.names) else [target, *subs]):
                    targets.add(t)
            else:
                targets.update(a.name for a in node.names)
            targets = tuple(sorted(t for t in targets if t in modules and t != name))
            found.append(Import(name, path, node, local, targets))
    return modules, found


def import_circles(root: Path) -> list[list[str]]:
    """Strongly connected components (more than one module) of the import graph, local imports included."""
    modules, imports = walk_package(root)
    graph = {m: set() for m in modules}
    for imp in imports:
        graph[imp.module].update(imp.targets)
    index, low, stack, on_stack, circles = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return circles


def _comment_lines(path: Path) -> dict[int, bool]:
    """Line number -> True if the line holds a comment and nothing else, False if it holds code and a comment."""
    comments, code = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = True
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            for line in range(tok.start[0], tok.end[0] + 1):
                code.add(line)
    return {line: line not in code for line in comments}


def unexplained_local_imports(root: Path) -> list[str]:
    """Function-local imports with no reason: no comment on the statement's lines, and the line right
    above is not a comment line. Each import statement needs its own reason."""
    _, imports = walk_package(root)
    bare, comment_cache = [], {}
    for imp in imports:
        if not imp.local:
            continue
        comments = comment_cache.setdefault(imp.path, _comment_lines(imp.path))
        node = imp.node
        on_statement = any(line in comments for line in range(node.lineno, node.end_lineno + 1))
        above = comments.get(node.lineno - 1) is True  # a comment-only line directly above
        if not (on_statement or above):
            bare.append(f"{imp.path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return bare


def private_imports(root: Path) -> list[str]:
    """`from X import _name` (a single-underscore name: another module's private name; dunders are public)."""
    _, imports = walk_package(root)
    found = []
    for imp in imports:
        if isinstance(imp.node, ast.ImportFrom):
            for alias in imp.node.names:
                if alias.name.startswith("_") and not (alias.name.startswith("__") and alias.name.endswith("__")):
                    found.append(f"{imp.path.relative_to(root)}:{imp.node.lineno}: {ast.unparse(imp.node)}")
    return found


def loaded_after_import(module: str, watched: str, extra_path: Path | None = None) -> bool:
    """Whether importing `module` in a fresh interpreter loads `watched`."""
    code = (f"import sys; {'sys.path.insert(0, %r); ' % str(extra_path) if extra_path else ''}"
            f"import {module}; print({watched!r} in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


# --- the package --------------------------------------------------------------------------------------------

def test_no_import_circle_counting_function_local_imports():
    assert import_circles(PACKAGE_ROOT) == []


def test_every_function_local_import_says_why():
    bare = unexplained_local_imports(PACKAGE_ROOT)
    assert not bare, ("function-local imports without a reason comment (hoist it to the top, or say why it must "
                      "stay local: start-up time, an optional dependency, a circle):\n" + "\n".join(bare))


def test_no_module_imports_another_modules_private_name():
    found = private_imports(PACKAGE_ROOT)
    assert not found, "imports of private names:\n" + "\n".join(found)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_importing_the_cli_and_config_modules_does_not_import_torch(module):
    assert not loaded_after_import(module, "torch"), f"`import {module}` imports torch (start-up time)"


# --- each check catches a broken package ---------------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def broken(tmp_path) -> Path:
    return _write(tmp_path / "brokenpkg", {
        "__init__.py": "",
        "a.py": """
            from typing import TYPE_CHECKING

            from . import b

            if TYPE_CHECKING:
                from .c import C  # not a runtime import: no edge a -> c


            def f():
                import json
                # a reason on the line above
                import os
                import re  # a reason on the line
                from .b import g  # fine
                return json, os, re, g
            """,
        "b.py": """
            def g():
                from .a import f  # circle: a imports this module at the top
                return f
            """,
        "c.py": """
            from .a import f  # c imports a; a imports c only under TYPE_CHECKING: no circle


            class C:
                def method(self):
                    from .b import _private_helper  # reaches into b's private name
                    from .a import __doc__ as doc  # a dunder is not private
                    return _private_helper, doc
            """,
        "sub/__init__.py": "",
        "sub/d.py": """
            def h():
                x = 1
                import sys
                '''# a hash in a string is no comment'''
                import math
                return x, sys, math
            """,
    })


def test_the_circle_check_finds_a_circle_made_by_a_function_local_import(broken):
    assert import_circles(broken) == [["brokenpkg.a", "brokenpkg.b"]]  # not c: its edge back is TYPE_CHECKING
    (broken / "b.py").write_text("def g():\n    return 1  # no import back\n")
    assert import_circles(broken) == []


def test_the_reason_check_finds_bare_local_imports(broken):
    assert unexplained_local_imports(broken) == ["a.py:11: import json", "sub/d.py:4: import sys",
                                                 "sub/d.py:6: import math"]


def test_the_private_name_check_finds_a_private_import(broken):
    assert private_imports(broken) == ["c.py:7: from .b import _private_helper"]


def test_the_torch_check_sees_a_module_that_loads_a_heavy_one(tmp_path):
    _write(tmp_path, {"heavypkg_dep.py": "", "heavypkg_cli.py": "import heavypkg_dep\n",
                      "lightpkg_cli.py": "def main():\n    import heavypkg_dep  # only when run\n"})
    assert loaded_after_import("heavypkg_cli", "heavypkg_dep", extra_path=tmp_path)
    assert not loaded_after_import("lightpkg_cli", "heavypkg_dep", extra_path=tmp_path)
