"""The layout is the architecture: each module belongs to one layer, and imports only
from its own layer or those below it. Checked on the source (ast), so an import
added anywhere, even inside a function, is caught."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Lowest first. A stage package comes after what it uses: the pipeline runs the
#: analysis and calls the similar-case library and the report builders, delivery
#: sends what the reports wrote, monitoring measures how the
#: model does from what came back, ops looks at all of them; the composition roots
#: (node, demo) wire the stages together; training builds on the node's code.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "contracts",
        (
            "service",
            "service.__init__",
            "service.settings",
            "service.ledger",
            "service.results",
            "service.model_card",
            "service.cli",
            "service.common",
            "service.migrations",
        ),
    ),
    ("model", ("service.model",)),
    ("datasets", ("service.datasets",)),
    ("ingest", ("service.ingest",)),
    ("outcomes", ("service.outcomes",)),
    ("similar", ("service.similar",)),
    ("reports", ("service.reports",)),
    ("pipeline", ("service.pipeline",)),
    ("delivery", ("service.delivery",)),
    ("monitoring", ("service.monitoring",)),
    ("ops", ("service.ops",)),
    ("composition", ("service.node", "service.demo", "service.__main__")),
    ("training", ("training",)),
]


def layer_of(module: str) -> int:
    """The layer of a module of ours (the longest matching prefix wins)."""
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank < 0:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")
    return rank


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path) -> set[str]:
    """Every module ``path`` imports, and every name it imports from one, at any depth
    of the file."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def our_imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at any depth of the file."""
    return {name for name in imported_names(path) if name.split(".")[0] in ("service", "training")}


SOURCES = sorted([*ROOT.joinpath("service").rglob("*.py"), *ROOT.joinpath("training").rglob("*.py")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_layers(path: Path) -> None:
    mine = layer_of(module_name(path))
    upward = sorted(
        f"{name} ({LAYERS[layer_of(name)][0]})"
        for name in our_imports(path)
        if _is_module_or_member(name) and layer_of(name) > mine
    )
    assert not upward, f"{module_name(path)} ({LAYERS[mine][0]}) imports a later layer: {upward}"


def _is_module_or_member(name: str) -> bool:
    """Whether ``name`` is one of our modules or a name inside one (``from x import y``
    lists both; only existing modules and their members count)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


def test_service_never_imports_training() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in ROOT.joinpath("service").rglob("*.py")
        if any(name.split(".")[0] == "training" for name in our_imports(path))
    ]
    assert not offenders


def test_every_stage_is_a_package_with_a_docstring() -> None:
    for _, prefixes in LAYERS[1:-2]:
        for prefix in prefixes:
            init = ROOT.joinpath(*prefix.split("."), "__init__.py")
            assert init.is_file(), f"{prefix} is not a package"
            assert ast.get_docstring(ast.parse(init.read_text())), f"{prefix} says nothing about its stage"


def test_test_code_imports_helpers_never_test_modules() -> None:
    """Fixtures live in conftest.py files, helpers in ``tests/support/``: a test module
    imported by another would run its tests and fixtures twice, under two names, and
    tie the two modules' tiers together."""
    test_modules = {path.stem for path in ROOT.joinpath("tests").rglob("test_*.py")} | {"conftest"}
    offenders = sorted(
        f"{path.relative_to(ROOT)} imports {name}"
        for path in [*ROOT.joinpath("tests").rglob("*.py"), *ROOT.joinpath("bench").glob("*.py")]
        for name in imported_names(path)
        if name.removeprefix("tests.").split(".")[0] in test_modules
    )
    assert not offenders, offenders
