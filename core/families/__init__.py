"""Base-model families: one module per family (`llama`, `mistral`, `gemma`, `phi`) holds everything the code must know
about it (linear layer names and shapes, transformers config class and tiny-model arguments, chat formats). Adding a
family is a module here, its line in `FAMILIES` and the `Family` literal of core/schemas.py, and catalogue entries.
"""

from __future__ import annotations

from core.families import gemma, llama, mistral, phi
from core.families.base import ChatRenderer, FamilySpec, plain

FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (llama.FAMILY, mistral.FAMILY, gemma.FAMILY, phi.FAMILY)}
CHAT_FORMATS: dict[str, ChatRenderer] = {"plain": plain} | {
    name: render for spec in FAMILIES.values() for name, render in spec.chat_formats.items()
}


def family(name: str) -> FamilySpec:
    """The family called `name` (a `Family` of core/schemas.py)."""
    return FAMILIES[name]
