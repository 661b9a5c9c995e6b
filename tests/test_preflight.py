"""The sweep's tracking-server preflight (tracking/preflight.py) against a server on 127.0.0.1 that demands
credentials, as an MLflow server behind basic auth or a token does: the checks send what MLflow's client sends, and a
refused or missing credential is one line naming the variables to set, with no secret in it or in the log."""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.errors import Unreachable
from tracking import preflight

pytestmark = pytest.mark.unit

USER, PASSWORD, TOKEN = "sweeper", "s3cret-pa55", "tok-0123456789"
BASIC = "Basic " + base64.standard_b64encode(f"{USER}:{PASSWORD}".encode()).decode()
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                        "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4")


@dataclass
class AuthServer:
    """What the server saw: (method, path, Authorization header) per request; `accepted` the headers it lets in."""

    uri: str
    accepted: set[str]
    seen: list[tuple[str, str, str]] = field(default_factory=list)


def handler_for(server: AuthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            if self.command == "PUT":
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
            auth = self.headers.get("Authorization", "")
            server.seen.append((self.command, self.path.split("?")[0], auth))
            # like a careless proxy, the refusal echoes what it was sent: the preflight must not pass it on
            status, body = (200, {}) if auth in server.accepted else (401, {
                "error_code": "UNAUTHENTICATED", "message": f"You are not authenticated (got {auth or 'nothing'})"})
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_DELETE = answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def auth_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[AuthServer]:
    """A server on 127.0.0.1 taking basic auth (USER, PASSWORD) or the bearer TOKEN; no MLflow credentials set."""
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # MLflow also reads ~/.mlflow/credentials
    state = AuthServer("", {BASIC, f"Bearer {TOKEN}"})
    http = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(state))
    state.uri = f"http://127.0.0.1:{http.server_address[1]}"
    thread = threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        http.shutdown()
        http.server_close()
        thread.join()


@pytest.mark.parametrize("variables, header", [
    ({"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD}, BASIC),
    ({"MLFLOW_TRACKING_TOKEN": TOKEN}, f"Bearer {TOKEN}"),
])
def test_every_check_sends_the_credentials_mlflow_sends(auth_server: AuthServer, monkeypatch: pytest.MonkeyPatch,
                                                         variables: dict[str, str], header: str) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    preflight.check_server(auth_server.uri, concurrency=4, timeout_s=10)
    methods = {(method, path.split("/loraland-preflight/")[0]) for method, path, _ in auth_server.seen}
    assert methods == {("GET", preflight.SEARCHES[0]), ("GET", preflight.SEARCHES[1]),
                       ("PUT", preflight.ARTIFACTS), ("DELETE", preflight.ARTIFACTS)}
    assert {auth for _, _, auth in auth_server.seen} == {header}
    assert len(auth_server.seen) == 1 + 4 + 2  # the credentials' search, the searches at once, the probe and its delete


@pytest.mark.parametrize("variables, userinfo, said", [
    ({"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": "wrong-" + PASSWORD}, False, "refused the"),
    ({"MLFLOW_TRACKING_TOKEN": "wrong-" + TOKEN}, False, "refused the"),
    ({}, True, "refused the"),  # requests sends a URI's user:password@ as basic auth
    ({}, False, "asks for credentials and none are set"),
])
def test_refused_or_missing_credentials_are_one_line_naming_the_variables_and_no_secret(
        auth_server: AuthServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        variables: dict[str, str], userinfo: bool, said: str) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    uri = auth_server.uri.replace("http://", f"http://{USER}:uri-{PASSWORD}@") if userinfo else auth_server.uri
    with caplog.at_level(logging.DEBUG), pytest.raises(Unreachable) as refused:
        preflight.check_server(uri, concurrency=4, timeout_s=10)
    message = str(refused.value)
    assert "\n" not in message and said in message and "HTTP 401" in message, message
    assert "MLFLOW_TRACKING_PASSWORD" in message and "MLFLOW_TRACKING_TOKEN" in message
    assert message.startswith(f"the MLflow server at {auth_server.uri} "), message  # the URI without its userinfo
    sent = [*variables.values(), f"uri-{PASSWORD}"]
    sent += [base64.standard_b64encode(f"{USER}:{value}".encode()).decode() for value in sent]
    for secret in sent:
        assert secret not in message and secret not in caplog.text, secret
    if variables or userinfo:
        assert "***" in message  # the server's echo of the header was masked, not dropped
    assert len(auth_server.seen) == 1  # nothing else is tried once the credentials are refused
