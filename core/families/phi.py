"""Phi (phi-2): attention projections with a `dense` output and a two-layer `fc1`/`fc2` MLP; `Instruct:/Output:`."""

from __future__ import annotations

from collections.abc import Sequence

from core.families.base import QKV, Dim, FamilySpec, Turn, fold_system


def phi(messages: Sequence[Turn]) -> str:
    """Phi-2's QA format: `Instruct:` and `Output:` lines, no system role (folded into the first user turn)."""
    lines = [f"Instruct: {m.content}" if m.role == "user" else f"Output: {m.content}" for m in fold_system(messages)]
    return "\n".join(lines) + "\nOutput:"


# attention (q, k, v, dense) and a two-layer MLP (fc1, fc2)
BLOCK: dict[str, tuple[Dim, Dim]] = QKV | {"dense": ("q", "hidden"), "fc1": ("hidden", "intermediate"),
                                          "fc2": ("intermediate", "hidden")}
FAMILY = FamilySpec("phi", "PhiConfig", BLOCK, {"phi": phi})
