"""The project as a user gets it: every import declared, and a quiet start."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SOURCES = [path for folder in (".", "tests", "benchmarks", "assets", "utils", "dev", "examples")
           for path in ROOT.glob(f"{folder}/*.py")]


def distribution(requirement):
    """`torch>=2.9` -> `torch`, in the normalized form (PEP 503) that both sides are compared in."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def undeclared_imports(sources, declared):
    """The third-party modules that `sources` import directly but no declared distribution provides."""
    providers = importlib.metadata.packages_distributions()  # module -> the distributions that install it
    local = {path.stem for path in SOURCES} | {"tests", "utils", "dev"}
    missing = {}
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for module in (name.split(".")[0] for name in names):
                if module in sys.stdlib_module_names or module in local or module == "__future__":
                    continue
                if not {distribution(d) for d in providers.get(module, [module])} & declared:
                    missing.setdefault(module, source.name)
    return missing


def declared_distributions():
    groups = PYPROJECT.get("dependency-groups", {}).values()
    return {distribution(r) for r in PYPROJECT["project"]["dependencies"] + [r for g in groups for r in g]}


def test_every_third_party_import_is_a_declared_dependency():
    assert undeclared_imports(SOURCES, declared_distributions()) == {}


def test_an_undeclared_import_is_caught(tmp_path):
    (tmp_path / "new.py").write_text("import numpy\nfrom yaml import safe_load\nimport json\n")
    missing = undeclared_imports([tmp_path / "new.py"], declared_distributions() - {"numpy"})
    assert set(missing) == {"numpy", "yaml"}


def test_uv_run_starts_quietly():
    """No "Bytecode compiled ..." line, nor any other, before a command's own output."""
    uv = os.environ.get("UV", "uv")  # `uv run` tells the programs it runs where it is
    result = subprocess.run([uv, "run", "python", "-c", "print(1)"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert (result.returncode, result.stdout, result.stderr) == (0, "1\n", "")


@pytest.mark.xdist_group("probe")
def test_xdist_groups_take_effect(request):
    """The runs that tests share (module-scoped fixtures) are made once only if the tests of a group go to one
    worker: pytest-xdist 3.8 marks them by adding the group to each test's id, which pytest 9.2 no longer lets it
    do. (Should a later pytest-xdist group tests another way, this test fails where the groups may still work:
    then check with two tests of one group that print PYTEST_XDIST_WORKER, and update it.)"""
    if not getattr(request.config.option, "loadgroup", False):  # what pytest-xdist sets in a worker for loadgroup
        pytest.skip("not run by pytest-xdist with --dist loadgroup (-n 0)")
    assert request.node.nodeid.endswith("@probe")


@pytest.mark.parametrize("script", [*ROOT.glob("*.py"), *ROOT.glob("examples/*.py")], ids=lambda path: path.name)
def test_no_script_calls_a_private_library_function(script):
    """A reader copies a script to learn the libraries' public API: a private (`_`-prefixed) function of theirs is
    neither documented nor kept. `os._exit` is public (a thread ending its process); the class attributes that the
    libraries document for users to read (`_no_split_modules`) are read, not called."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    private = [f"{node.func.attr} (line {node.lineno})" for node in ast.walk(tree) if isinstance(node, ast.Call)
               and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("_")
               and not node.func.attr.startswith("__") and node.func.attr != "_exit"]
    private += [f"{alias.name} (line {node.lineno})" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names if alias.name.startswith("_")]
    assert private == []
