"""The package's layers, as docs/design.md draws them, held by reading the imports.

``fusestore.pool`` (the files in the datadirs) knows nothing of FUSE, of the
service around it or of the admin commands; the FUSE server (``fusestore.fuse``)
knows the pool only through its handlers; placement is a pure function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fusestore"


def imports_of(path: Path, package: str | None = None) -> set[str]:
    """Every module ``path`` imports, by its absolute dotted name (``package``:
    the one it belongs to, by default from where it lies)."""
    if package is None:
        package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def modules_in(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).glob("*.py"))


def crossing(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        name
        for name in imports_of(path)
        if any(name == f or name.startswith(f"{f}.") for f in forbidden)
    )


@pytest.mark.parametrize("module", modules_in("pool"), ids=lambda path: path.name)
def test_the_pool_imports_no_fuse_service_or_admin(module: Path) -> None:
    forbidden = ("fusestore.fuse", "fusestore.service", "fusestore.admin", "fusestore.cli")
    assert crossing(module, (*forbidden, "pyfuse3", "trio", "sdnotify")) == []


@pytest.mark.parametrize("module", modules_in("fuse"), ids=lambda path: path.name)
def test_the_fuse_server_knows_the_pool_only_through_its_handlers(module: Path) -> None:
    assert crossing(module, ("fusestore.service", "fusestore.admin", "fusestore.cli")) == []
    if module.name != "handlers.py":
        assert crossing(module, ("fusestore.pool",)) == []


def test_placement_is_pure() -> None:
    imported = imports_of(PACKAGE / "pool" / "placement.py")
    io = ("os", "io", "socket", "subprocess", "pathlib", "shutil", "fusestore")
    assert [name for name in imported if name.split(".")[0] in io] == []


def test_the_move_planner_is_pure() -> None:
    """drain/balance plans (``rebalance.py``) are decided without touching a disk."""
    imported = imports_of(PACKAGE / "pool" / "rebalance.py")
    io = ("os", "io", "socket", "subprocess", "pathlib", "shutil")
    assert [name for name in imported if name.split(".")[0] in io] == []
    project = {name for name in imported if name.startswith("fusestore")}
    assert project <= {"fusestore.pool.placement"} | {
        f"fusestore.pool.placement.{n}" for n in ("DatadirSpace", "choose_datadir")
    }


def test_the_check_sees_a_crossing(tmp_path: Path) -> None:
    """The reading of imports itself: a pool module importing the FUSE side is caught."""
    bad = tmp_path / "probe.py"
    bad.write_text("from fusestore.fuse import protocol as p\nfrom . import pool\n")
    assert "fusestore.pool.pool" in imports_of(bad, "fusestore.pool")
    found = imports_of(bad, "fusestore.pool")
    assert sorted(n for n in found if n.startswith("fusestore.fuse")) == [
        "fusestore.fuse",
        "fusestore.fuse.protocol",
    ]
