"""
The package layout reads as the flow of a message, and imports only point
down it: each module imports from its own package or from a lower layer,
never up, so there is no import circle between the stages. Read from the
source with C{ast}; nothing is imported.

Layers, lowest first (docs/architecture.md):

 -1. C{dkimkeys}, C{hangup}: leaves that import nothing of relaynet (the
    configuration reads DKIM keys with the first; nodes, supervisors and
    workers hold SIGHUP from their start with the second);

 0. C{relaynet}, C{config}, C{events}, C{hints}, C{zones}: the ground every stage
    stands on;
 1. C{smtp/} (the wire) and C{queue/} (spool, core, DSNs): they do not
    import each other;
 2. C{delivery/}: routing table, one attempt, the client, local mailboxes;
 3. C{intake/}, C{admin/}, C{runner}: the server side, administration, and
    the orchestration of queue and delivery;
 4. C{node}, C{lab/}, C{testing/}: assembly, labs, the public fakes;
 5. C{tap}, C{cli}; 6. C{demo}.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "relaynet"

LAYERS: dict[str, int] = {
    "relaynet": 0, "relaynet.config": 0, "relaynet.events": 0, "relaynet.hints": 0, "relaynet.zones": 0,
    "relaynet.dkimkeys": -1, "relaynet.hangup": -1,
    "relaynet.smtp": 1, "relaynet.queue": 1,
    "relaynet.delivery": 2,
    "relaynet.intake": 3, "relaynet.admin": 3, "relaynet.runner": 3,
    "relaynet.node": 4, "relaynet.lab": 4, "relaynet.testing": 4,
    "relaynet.supervisor": 5,
    "relaynet.tap": 6, "relaynet.cli": 6,
    "relaynet.worker": 7, "relaynet.demo": 7,
}


def unit(module: str) -> str:
    """The layer unit of a module: its stage package, or the top-level module itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append((".".join(parts), path))
    return out


def imports(path: Path, prefix: str = "relaynet") -> set[str]:
    """Every module under C{prefix} that C{path} imports, at any depth (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m == prefix or m.startswith(prefix + ".")}


def test_every_module_has_a_layer() -> None:
    """A new stage package or top-level module must be given its place in the flow."""
    assert {unit(m) for m, _ in modules()} <= set(LAYERS)


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_imports_point_down(module: str, path: Path) -> None:
    """A module imports from its own stage or from a lower layer only."""
    here = unit(module)
    up = sorted(
        imported for imported in imports(path)
        if unit(imported) != here and LAYERS[unit(imported)] >= LAYERS[here]
    )
    assert up == [], f"{module} (layer {LAYERS[here]}) imports upward or sideways: {up}"


def test_the_package_ships_no_test_harness() -> None:
    """Private Postfix instances, sinks and node processes live in harness/, outside the wheel."""
    assert not (ROOT / "peers.py").exists()
    for module, path in modules():
        for outside in ("harness", "tests", "bench"):
            assert not imports(path, outside), (module, outside)
