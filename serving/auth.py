"""API keys scoped to models: who may call the endpoint, and which model ids each key may use.

Keys never come from the serve config YAML. They come from a keys document, YAML or JSON:

```yaml
keys:
  - name: legal-team            # for logs; never the secret
    key: sk-...                 # the bearer token (at least 16 characters)
    models: ["*:legal", "llama-2-7b"]   # fnmatch patterns over model ids; default ["*"]
```

read from `$LORALAND_API_KEYS` (the document itself) or from a file: `api_keys_file` in the config, else
`$LORALAND_API_KEYS_FILE` (for example a Kubernetes secret mounted as a file). The file is read again when
its modification time changes, so keys are added or revoked without a restart (a file that no longer
parses keeps the last good keys and logs why, never a key itself; a file that is gone revokes its keys). The
config's single `api_key`, when set, is one more key that may use every model.

A request's key is compared with every configured key in constant time (`hmac.compare_digest` over
SHA-256 digests, no early exit). A missing or unknown key is a 401 in OpenAI's error shape. A model
outside the key's patterns is answered exactly as a model that does not exist: the same 404, whose list of
served ids holds only what the key may use, so a scoped key cannot probe which other adapters exist. A
task's champion id (`legal`) is in scope when its `<base>:<task>` form (`llama-2-7b:legal`) is, so
`*:legal` covers the champion too. `/v1/models` lists what the key may use.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import Field

from core.errors import ConfigError
from core.parsing import SECRET, parse_model
from core.schemas import StrictModel
from serving.adapters import ModelResolver, Route
from serving.api import APIError

log = logging.getLogger(__name__)

API_KEYS_ENV = "LORALAND_API_KEYS"  # the keys document itself
API_KEYS_FILE_ENV = "LORALAND_API_KEYS_FILE"  # a path to it
MIN_KEY_LENGTH = 16
EVERY_MODEL = ("*",)


class KeyEntry(StrictModel):
    """One API key and the model ids it may call."""

    name: str = Field(min_length=1, description="Who holds the key (logged; never the key itself).")
    key: str = Field(min_length=MIN_KEY_LENGTH, description="The bearer token.", json_schema_extra=SECRET)
    models: list[str] = Field(default_factory=lambda: list(EVERY_MODEL), min_length=1,
                              description="fnmatch patterns over model ids (`*:legal`, a base model name, `*`).")


class KeysDocument(StrictModel):
    """A keys file or `$LORALAND_API_KEYS`."""

    keys: list[KeyEntry] = Field(description="The API keys.")


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's name and the model patterns it may use."""

    name: str
    patterns: tuple[str, ...] = EVERY_MODEL

    @property
    def unrestricted(self) -> bool:
        return "*" in self.patterns

    def may_use(self, model: str, base_model: str | None = None) -> bool:
        """True when `model` (or, for a task champion id served on `base_model`, `<base>:<task>`) matches a pattern."""
        champion_id = base_model is not None and model != base_model and ":" not in model
        names = [model, f"{base_model}:{model}"] if champion_id else [model]
        return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in self.patterns)


ANYONE = Caller("anyone")  # no key is configured: every request may use every model


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_keys(text: str, source: str) -> list[KeyEntry]:
    """The keys of a keys document (YAML or JSON); ConfigError naming every problem."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(source, [f"not valid YAML or JSON ({str(error).splitlines()[0]})"]) from None
    keys = parse_model(KeysDocument, data, source).keys
    names = [entry.name for entry in keys]
    if len(set(names)) != len(names) or len({entry.key for entry in keys}) != len(keys):
        raise ConfigError(source, ["keys: every key needs its own name and its own secret"])
    return keys


@dataclass
class KeyRing:
    """The configured keys; `authenticate` maps a request's Authorization header to a Caller."""

    legacy_key: str | None = None  # the config's `api_key`: every model
    inline: str | None = None  # $LORALAND_API_KEYS
    path: Path | None = None  # api_keys_file or $LORALAND_API_KEYS_FILE
    entries: list[tuple[bytes, Caller]] = field(default_factory=list)
    stamp: tuple[int, int] | None = None  # (mtime_ns, size) of the file as last read; None: no file
    loaded: bool = False

    @classmethod
    def from_settings(cls, api_key: str | None, api_keys_file: str | None) -> KeyRing:
        """The keys of a ServeConfig (`api_key`, `api_keys_file`) and the environment; ConfigError if a source is
        bad."""
        file = api_keys_file or os.environ.get(API_KEYS_FILE_ENV) or None
        ring = cls(api_key, os.environ.get(API_KEYS_ENV) or None, Path(file) if file else None)
        ring.reload(strict=True)
        return ring

    @property
    def required(self) -> bool:
        """True when requests need a key (some key is configured)."""
        return bool(self.legacy_key or self.inline or self.path)

    def reload(self, strict: bool = False) -> None:
        """Read the keys again when the file changed; a bad file raises when `strict`, else keeps the last keys."""
        stamp = self._file_stamp(strict)
        if self.loaded and stamp == self.stamp:
            return
        if self.path is not None and stamp is None:
            log.warning("the API keys file %s is gone: its keys are revoked", self.path)
        try:
            keys = parse_keys(self.inline, f"${API_KEYS_ENV}") if self.inline else []
            if self.path is not None and stamp is not None:
                keys += parse_keys(self.path.read_text(), str(self.path))
        except (ConfigError, OSError) as error:
            if strict:
                raise
            log.error("API keys not reloaded, the last good keys stay in force: %s", error)
            return
        legacy = [(digest(self.legacy_key), Caller("api_key"))] if self.legacy_key else []
        self.entries = legacy + [(digest(entry.key), Caller(entry.name, tuple(entry.models))) for entry in keys]
        self.stamp, self.loaded = stamp, True
        log.info("API keys loaded: %d", len(self.entries))

    def _file_stamp(self, strict: bool) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            status = self.path.stat()
        except OSError as error:
            if strict:
                raise ConfigError(str(self.path), [f"the API keys file cannot be read ({error.strerror})"]) from None
            return None  # gone (a Kubernetes secret is swapped by renaming a link, never by deleting): revoked
        return status.st_mtime_ns, status.st_size

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller a `Bearer <key>` header names; ANYONE when no key is configured; 401 otherwise."""
        if not self.required:
            return ANYONE
        self.reload()
        scheme, _, token = (authorization or "").partition(" ")
        given = digest(token.strip() if scheme.lower() == "bearer" else "")
        found: Caller | None = None
        for secret, caller in self.entries:  # every key is compared: the time taken does not say which matched
            if hmac.compare_digest(given, secret) and found is None:
                found = caller
        if found is None or not token.strip():
            raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")
        return found


def host_allowed(host: str | None, names: Collection[str]) -> bool:
    """Whether a request's `Host` header may reach an endpoint without keys: an IP address, `localhost` or one of
    `names` (a DNS-rebinding page sends its own domain name there). A request without the header is let through."""
    if not host:
        return True
    try:
        hostname = urlsplit(f"//{host}").hostname or ""
    except ValueError:  # an unbalanced IPv6 bracket
        return False
    try:
        ipaddress.ip_address(hostname)
        return True
    except ValueError:
        return hostname in {"localhost", *(name.lower() for name in names)}


def visible_cards(cards: list[dict[str, Any]], caller: Caller) -> list[dict[str, Any]]:
    """The /v1/models entries `caller` may use (a card's `owned_by` is the base model serving it)."""
    if caller.unrestricted:
        return cards
    return [card for card in cards if caller.may_use(str(card["id"]), str(card["owned_by"]))]


async def resolve_in_scope(resolver: ModelResolver, caller: Caller, model: str) -> Route:
    """The route of `model` for `caller`. A model outside its scope gets the very answer an unknown model gets
    (`ModelResolver.refuse`: a 404 listing only the ids the caller may use, or a 503 while the registry cannot be
    read), so the answer does not say whether the model exists."""
    if caller.unrestricted:
        return await resolver.resolve(model)
    try:
        route: Route | None = await resolver.resolve(model)
    except APIError as error:
        if error.code != "model_not_found":
            raise
        route = None
    if route is None or not caller.may_use(route.model, route.base_model):
        await resolver.refuse(model, [str(card["id"]) for card in visible_cards(await resolver.cards(), caller)])
    assert route is not None
    return route
