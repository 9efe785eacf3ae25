"""The harness judges from outside: no module of testbed/ imports enforcer.core, and the
enforcer's public modules are read in a few named places only (issue 14).

Imports are read with ast: import statements, importlib.import_module and __import__
calls with a constant name, and the Python programs a module carries as strings (what
the harness runs in a namespace with ``python -c``)."""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import testbed

TESTBED = Path(testbed.__file__).parent
# Where testbed/ may import the enforcer's public modules, and which
ALLOWED = {
    # the enforcer's driver: the GUIDs its config names (those its bundled filters
    # watch), and what a few checks inspect of it (its NAT maps' nft table, the
    # conntrack mark of a user-mode flow, its control line limit)
    "lab.py": {"enforcer.dataplane", "enforcer.plugins.ftp", "enforcer.plugins.tftp",
               "enforcer.protocol"},
    # the ``pinhole`` command, whose ``enforcer`` and ``ctl`` subcommands are the enforcer's
    "cli.py": {"enforcer.cli"},
    # IPF-01 checks the enforcer's IpFilter object itself (no firewall behaviour)
    "clauses/test_rab.py": {"enforcer.client"},
}


def imported(source: str) -> Iterator[str]:
    """Every module name ``source`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and _imports(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield first.value
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
            with contextlib.suppress(SyntaxError):  # text, not a program
                yield from imported(node.value)


def _imports(func: ast.expr) -> bool:
    """Whether a call of ``func`` imports the module its first argument names."""
    return ((isinstance(func, ast.Name) and func.id == "__import__")
            or (isinstance(func, ast.Attribute) and func.attr == "import_module"))


def enforcer_imports() -> dict[str, set[str]]:
    """Per module of testbed/ (its path under it), the enforcer modules it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted(TESTBED.rglob("*.py")):
        names = {name for name in imported(path.read_text())
                 if name == "enforcer" or name.startswith("enforcer.")}
        if names:
            found[str(path.relative_to(TESTBED))] = names
    return found


def is_core(name: str) -> bool:
    return name == "enforcer.core" or name.startswith("enforcer.core.")


def modules(names: set[str]) -> set[str]:
    """The enforcer's modules among ``names``: a name under another is an attribute of it."""
    named = names - {"enforcer"}
    return {name for name in named if not any(name.startswith(f"{other}.") for other in named)}


def test_no_module_of_the_harness_imports_enforcer_core() -> None:
    offenders = {module: sorted(filter(is_core, modules(names)))
                 for module, names in enforcer_imports().items() if any(map(is_core, names))}
    assert not offenders, f"testbed/ imports the enforcer's core: {offenders}"


def test_the_enforcer_s_public_modules_are_imported_only_where_allowed() -> None:
    found = {module: modules(names) for module, names in enforcer_imports().items()}
    for module, names in found.items():
        extra = names - ALLOWED.get(module, set())
        assert not extra, f"testbed/{module} imports {sorted(extra)} of the enforcer"
    assert found == ALLOWED, "ALLOWED names an import that is gone: keep it to what is there"


@pytest.mark.parametrize("source", [
    "from enforcer.core.flags import Flags",
    "from enforcer.core import socks",
    "from enforcer import core",
    "import enforcer.core.results as results",
    "import importlib\nimportlib.import_module('enforcer.core.ipfilter')",
    "__import__('enforcer.core')",
    "CODE = '''\nimport sys\nfrom enforcer.core.packet import parse\n'''",
])
def test_every_way_of_importing_the_core_is_seen(source: str) -> None:
    assert any(map(is_core, imported(source))), source


def test_a_docstring_that_names_the_core_is_no_import() -> None:
    assert not any(map(is_core, imported('"""See enforcer.core.ipfilter for the object."""')))
