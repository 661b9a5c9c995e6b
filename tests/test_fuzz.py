"""Fuzzing the endpoint (issue 23, point 3): schemathesis draws requests, valid and not, for every operation of the real
ingress app's OpenAPI schema (the `/v1` routes and the page's data routes, request bodies included: `serving.api.
json_body`), with no key, a key scoped to one task and a key for every model, against the app served by uvicorn on
loopback (one event loop, as in a Serve replica), its replicas the fake engine (tests/test_security_serving.py's
harness). No answer may be a 5xx, none may hang (each call is bounded), and `/v1/models` must keep answering within
1 s (a bound on a stall of the event loop, not a speed check) while the fuzzer runs.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tests.tracking_fixtures import Server

EXAMPLES = 10  # per operation and generation mode: the whole test stays well under a minute
CALL_TIMEOUT_S = 15.0  # a call taking longer counts as a hang


@pytest.mark.integration
def test_fuzzed_requests_get_no_5xx_and_the_api_keeps_answering(mlflow_server: Server, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.core.result import Ok
    from schemathesis.generation import GenerationMode

    import tests.fake_engine as fake_engine
    from tests.test_security_serving import FULL_KEY, KEYS, SCOPED_KEY, ingress_app, local_servers, probe_models, served

    monkeypatch.setattr(fake_engine, "TOKEN_DELAY_S", 0.0)  # answers as fast as the fake can give them
    monkeypatch.setenv("LORALAND_API_KEYS", KEYS)
    monkeypatch.delenv("LORALAND_API_KEYS_FILE", raising=False)
    app = ingress_app(mlflow_server.uri, local_servers(tmp_path))
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert {op.path for op in operations} >= {"/v1/models", "/v1/completions", "/v1/chat/completions",
                                              "/web/api/tasks/{task}/prompt", "/web/api/tasks/{task}/score"}
    server_errors: list[str] = []
    probe_failures: list[str] = []
    probes = 0
    stop = threading.Event()

    with served(app) as url:
        def probe() -> None:
            nonlocal probes
            while not stop.wait(0.2):
                try:
                    status = probe_models(url, FULL_KEY)
                    if status != 200:
                        probe_failures.append(f"status {status}")
                except Exception as error:  # a timeout above all: the event loop stalled
                    probe_failures.append(repr(error))
                probes += 1

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        try:
            for operation in operations:
                cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                                  operation.as_strategy(GenerationMode.NEGATIVE))

                @given(case=cases, key=st.sampled_from([None, SCOPED_KEY, FULL_KEY]))
                @settings(max_examples=2 * EXAMPLES, deadline=None, database=None, derandomize=True,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
                def call(case: Any, key: str | None) -> None:
                    headers = {"Authorization": f"Bearer {key}"} if key else {}
                    response = case.call(base_url=url, headers=headers, timeout=CALL_TIMEOUT_S)
                    if response.status_code >= 500:
                        server_errors.append(f"{case.method} {case.formatted_path} {case.body!r:.200} -> "
                                             f"{response.status_code} {response.text[:300]}")

                call()
        finally:
            stop.set()
            prober.join(timeout=5)
    assert not server_errors, "\n".join(server_errors[:10])
    assert probes > 0 and not probe_failures, probe_failures[:5]
