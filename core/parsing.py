"""Reading our YAML files and validating data against a schema; every problem is one line of a ConfigError."""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import JsonDict

from core.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)


SECRET: JsonDict = {"secret": True}  # `Field(json_schema_extra=SECRET)`: errors about the field never show its value
CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")  # the `user:pass@` of a URL


def hide_credentials(text: str, mask: str = "***@") -> str:
    """`text` with the `user:pass@` of every URL in it replaced by `mask` (a tracking URI in a message; "" for a
    link, which the browser then asks credentials for itself)."""
    return CREDENTIALS.sub(mask, text)


def format_validation_error(error: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    """One line per pydantic error: `field.path: message (got value)`; never the value of a field of `model` marked
    SECRET (nor, then, pydantic's message, which may quote it)."""
    lines = []
    for item in error.errors():
        parts = (f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"])
        loc = "".join(parts).lstrip(".") or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (remove it or check its spelling)"
        got = item.get("input")
        shown = "" if item["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        if model is not None and is_secret(model, item["loc"]):
            message, shown = f"{message.split(' (', 1)[0].split(',', 1)[0]} (the value is secret: not shown)", ""
        lines.append(f"{loc}: {message}{shown}")
    return lines


def is_secret(model: type[BaseModel], loc: tuple[int | str, ...]) -> bool:
    """Whether `loc` (a pydantic error's location) leads into a field marked SECRET."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return False
        if field.json_schema_extra == SECRET:
            return True
        current = next((kind for kind in _types_in(field.annotation) if issubclass(kind, BaseModel)), None)
    return False


def _types_in(annotation: Any) -> list[type]:
    """The classes an annotation names (`list[KeyEntry] | None` -> list, KeyEntry, NoneType)."""
    found = [annotation] if isinstance(annotation, type) and not typing.get_args(annotation) else []
    return found + [kind for arg in typing.get_args(annotation) for kind in _types_in(arg)]


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one of our YAML files, which all hold a mapping of keys; a missing or unreadable file, bytes
    that are not UTF-8, a syntax error, an empty file or another top-level value is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["not a file" if path.exists() else "file not found"])
    try:
        raw = path.read_bytes()
        data = yaml.safe_load(raw.decode("utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file ({exc.strerror or exc})"]) from None
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(str(path),
                          [f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}, line {line}); "
                                      "save the file as UTF-8"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(str(path), [f"{where}not valid YAML ({problem})"]) from None
    if data is None:
        raise ConfigError(str(path), ["the file is empty (or only comments); expected a mapping of keys"])
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"expected a mapping of keys at the top level, got a {type(data).__name__}"])
    return data


def parse_model(model: type[Model], data: Any, source: str, context: Mapping[str, Any] | None = None) -> Model:
    """Validate `data` as `model` (validators see `context`, e.g. the catalogue to resolve names in), raising
    ConfigError with one line per problem."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(source, format_validation_error(exc, model)) from None


def dump_yaml(model: BaseModel, path: str | Path) -> None:
    """Write a config as YAML that `load_*` reads back identically."""
    Path(path).write_text(yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False))
