"""API keys scoped to models (serving/auth.py): where keys come from, 401 in OpenAI's shape, the scope of a task's
champion id, /v1/models and 404 lists cut to the key's scope, a model outside the scope answered as an unknown one,
constant-time comparison over every key, and a reload of the keys file without a restart. Over HTTP against a real
app: tests/test_serving_faults.py."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConfigError
from serving import auth
from serving.adapters import ModelResolver
from serving.api import APIError
from serving.auth import API_KEYS_ENV, API_KEYS_FILE_ENV, Caller, KeyRing, resolve_in_scope, visible_cards
from tests.test_serving import version
from tracking.registry import TaskAdapters

pytestmark = pytest.mark.unit

LEGAL = "sk-legal-0123456789"
ADMIN = "sk-admin-0123456789"
KEYS = f"""keys:
  - {{name: legal, key: {LEGAL}, models: ["*:legal", "llama"]}}
  - {{name: admin, key: {ADMIN}}}
"""


def bearer(key: str) -> str:
    return f"Bearer {key}"


def keys_file(tmp_path: Path, text: str = KEYS) -> Path:
    path = tmp_path / "api-keys.yaml"
    path.write_text(text)
    return path


def rename(body: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """An error body with the model id `old` in its message replaced by `new` (as repr, the way messages quote it)."""
    error = body["error"]
    return {"error": error | {"message": error["message"].replace(repr(old), repr(new))}}


def status_of(call: object) -> int:
    assert callable(call)
    with pytest.raises(APIError) as caught:
        call()
    error = caught.value
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    return error.status


@pytest.fixture(autouse=True)
def no_key_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    monkeypatch.delenv(API_KEYS_FILE_ENV, raising=False)


def test_scope_patterns_cover_a_champion_through_its_base_pair() -> None:
    legal = Caller("legal", ("*:legal", "llama"))
    assert legal.may_use("llama") and legal.may_use("llama:legal") and legal.may_use("mistral:legal")
    assert legal.may_use("legal", base_model="mistral")  # the task champion, served on mistral
    assert not legal.may_use("mistral") and not legal.may_use("llama:medical") and not legal.may_use("medical", "llama")
    assert not legal.may_use("legal")  # a champion id alone says nothing of where it runs


def test_keys_from_a_file_from_the_environment_and_the_config_key(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing.from_settings(None, str(keys_file(tmp_path)))
    assert ring.authenticate(bearer(LEGAL)).patterns == ("*:legal", "llama")
    assert ring.authenticate(bearer(ADMIN)).unrestricted
    for header in (None, "", "Bearer", bearer("sk-unknown-0123456789"), LEGAL, f"Basic {LEGAL}"):
        assert status_of(lambda header=header: ring.authenticate(header)) == 401, header
    monkeypatch.setenv(API_KEYS_ENV, '{"keys": [{"name": "env", "key": "sk-from-the-environment"}]}')
    monkeypatch.setenv(API_KEYS_FILE_ENV, str(keys_file(tmp_path)))
    both = KeyRing.from_settings("sk-test-loraland", None)  # the config's one key, the variable's keys, the file's
    assert [both.authenticate(bearer(key)).name for key in ("sk-test-loraland", "sk-from-the-environment", LEGAL)] == \
        ["api_key", "env", "legal"]
    monkeypatch.delenv(API_KEYS_ENV)
    monkeypatch.delenv(API_KEYS_FILE_ENV)
    assert KeyRing.from_settings(None, None).authenticate(None) is auth.ANYONE  # no key configured: open, as before


@pytest.mark.parametrize("text, problem", [
    ("keys: [{name: a, key: short}]", "keys[0].key"),
    ("keys: [{name: a, key: sk-0123456789abcdef, scope: ['*']}]", "keys[0].scope"),
    (f"keys: [{{name: a, key: {LEGAL}}}, {{name: a, key: {ADMIN}}}]", "own name"),
    ("keys: [", "not valid YAML"),
])
def test_a_bad_keys_file_is_refused_at_start_naming_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        KeyRing.from_settings(None, str(keys_file(tmp_path, text)))
    with pytest.raises(ConfigError, match="cannot be read"):
        KeyRing.from_settings(None, str(tmp_path / "missing.yaml"))


def test_the_keys_file_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    path = keys_file(tmp_path)
    ring = KeyRing.from_settings(None, str(path))
    new = "sk-new-team-0123456789"
    path.write_text(f"keys: [{{name: new, key: {new}}}, {{name: admin, key: {ADMIN}}}]\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    assert ring.authenticate(bearer(new)).name == "new"
    assert status_of(lambda: ring.authenticate(bearer(LEGAL))) == 401  # revoked without a restart
    path.write_text("keys: [")  # a half-written file: the last good keys stay
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 2_000_000_000))
    assert ring.authenticate(bearer(new)).name == "new"


def test_every_key_is_compared_whichever_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing.from_settings("sk-test-loraland", str(keys_file(tmp_path)))
    compared: list[int] = []
    real = auth.hmac.compare_digest

    def counted(a: bytes, b: bytes) -> bool:
        compared.append(len(a))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counted)
    for key in ("sk-test-loraland", ADMIN, "sk-unknown-0123456789"):
        compared.clear()
        try:
            ring.authenticate(bearer(key))
        except APIError:
            pass
        assert compared == [32, 32, 32], key  # three keys, equal-length digests, none skipped


def test_listing_and_404_show_only_what_the_key_may_use_and_out_of_scope_is_unknown() -> None:
    published = {"legal": TaskAdapters("legal", [version("legal", 1, "llama", 0.9)], champion="1"),
                 "medical": TaskAdapters("medical", [version("medical", 1, "llama", 0.8)], champion="1")}
    resolver = ModelResolver({"llama": None, "mistral": None}, lambda: published, ttl_s=60, timeout_s=5)
    legal = Caller("legal", ("*:legal", "llama"))

    async def scenario() -> None:
        cards = await resolver.cards()
        assert [card["id"] for card in visible_cards(cards, legal)] == ["llama", "llama:legal", "legal"]
        assert visible_cards(cards, auth.ANYONE) == cards
        assert (await resolve_in_scope(resolver, legal, "legal")).adapter == "loraland-legal/1"
        with pytest.raises(APIError) as missing:
            await resolve_in_scope(resolver, legal, "nope")
        assert missing.value.status == 404
        assert "medical" not in missing.value.message and "llama:legal" in missing.value.message
        for model in ("medical", "llama:medical", "mistral", "mistral:legal"):  # served, not to this key: unknown
            with pytest.raises(APIError) as hidden:
                await resolve_in_scope(resolver, legal, model)
            assert hidden.value.status == 404, model
            assert hidden.value.body() == rename(missing.value.body(), "nope", model)  # nothing tells them apart
        assert (await resolve_in_scope(resolver, auth.ANYONE, "medical")).adapter == "loraland-medical/1"

    asyncio.run(scenario())


def test_while_the_registry_is_down_out_of_scope_and_unknown_get_the_same_503() -> None:
    published = {"medical": TaskAdapters("medical", [version("medical", 1, "llama", 0.8)], champion="1")}
    down = threading.Event()

    def read() -> dict[str, TaskAdapters]:
        if down.is_set():
            raise OSError("registry down")
        return published

    resolver = ModelResolver({"llama": None}, read, ttl_s=60, timeout_s=5)
    legal = Caller("legal", ("*:legal", "llama"))

    async def scenario() -> None:
        await resolver.cards()  # a first view of the registry
        down.set()
        refused = {}
        for model in ("nope", "medical"):  # unknown; served, but outside the key's scope
            resolver.read_at = -float("inf")  # the view has aged past every refresh interval
            with pytest.raises(APIError) as caught:
                await resolve_in_scope(resolver, legal, model)
            refused[model] = caught.value
        assert refused["nope"].status == 503
        assert refused["medical"].body() == rename(refused["nope"].body(), "nope", "medical")  # the same answer

    asyncio.run(scenario())
