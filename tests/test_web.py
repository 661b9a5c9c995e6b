"""The LoRA Land page (serving/web/, serving/webapp.py) in a browser, and what it ships.

Browser tests open the page in headless Chromium (the distribution's package, driven by Playwright) against the real
app on loopback serving the tiny 2 x 2 sweep's adapters (their task cards as the train runs published them), and
compare every answer the page shows with what `/v1` answers for the same model id and prompt with greedy decoding.
Without /usr/bin/chromium they skip, naming the install command; under CI (`CI` set) they fail instead. The page's
data routes and the task cards, without a browser: tests/test_web_data.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.catalog import load_catalog
from core.paths import PROJECT_ROOT
from core.ports import free_port
from core.prompts import completion_for, prompt_for
from core.schemas import EvalSettings
from jobs.data import eval_rows
from tests.tracking_fixtures import BASES, Sweep

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = PROJECT_ROOT / "docs" / "web_page.png"
WEB_DIR = PROJECT_ROOT / "serving" / "web"
API_KEY = "web-test-key"
BROKEN_TASK = "demo_similarity"  # registered here only: a good adapter on tiny-llama, a broken one on tiny-mistral
TIMEOUT_MS = 180_000


# --------------------------------------------------------------------------- unit


@pytest.mark.unit
def test_make_demo_prints_where_loraland_serve_shows_the_page() -> None:
    from orchestrator.demo import demo_page_url
    from serving.config import BaseDeployment, ServeConfig
    from serving.webapp import config_page_url

    assert demo_page_url() == "http://127.0.0.1:8000/"  # configs/serve/demo.yaml: its http_options and route_prefix
    config = ServeConfig(port=9000, route_prefix="/lora",
                         deployments=[BaseDeployment(base_model="tiny-llama", device="cpu")])
    assert config_page_url(config) == "http://127.0.0.1:9000/lora/"


@pytest.mark.unit
def test_page_ships_in_the_package_and_needs_nothing_from_the_internet() -> None:
    import tomllib

    config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert "web/*" in config["tool"]["setuptools"]["package-data"]["serving"]
    for name in ("index.html", "app.js", "style.css"):
        text = (WEB_DIR / name).read_text()
        other_host = re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE)
        assert not other_host, f"{name} refers to another host"
        assert "localStorage" not in text and "console.log" not in text  # the API key stays in the tab, unlogged


# --------------------------------------------------------------------------- browser, against the real app


def require_chromium() -> None:
    """Skip without the distribution's Chromium, naming the install command; under CI that is a failure."""
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` to run the browser tests"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Site:
    url: str  # the page
    api: str  # the OpenAI base URL (.../v1)
    tracking: str  # the MLflow server the adapters were published to

    def complete(self, body: dict[str, Any]) -> httpx.Response:
        """A non-streaming completion with the request body the page sent."""
        plain = {key: value for key, value in body.items() if key not in ("stream", "stream_options")}
        return httpx.post(f"{self.api}/completions", json=plain, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=120)


def publish_broken_task(sweep: Sweep, root: Path) -> None:
    """BROKEN_TASK: a working tiny-llama adapter (the champion) and a tiny-mistral one with unreadable weights (copies
    of the sweep's demo_sentiment adapters), each logged with a run of its own that published the task's card."""
    from tracking import registry, store
    from tracking.cards import publish_task_card

    task, client = load_catalog().task(BROKEN_TASK), store.client(sweep.uri)
    experiment_id = store.ensure_experiment("web-test-adapters", sweep.uri)
    for base, registered_score in (("tiny-llama", 0.9), ("tiny-mistral", 0.1)):
        folder = root / base
        shutil.copytree(sweep.job("train", base, "demo_sentiment").result.adapter_dir, folder)
        if base == "tiny-mistral":
            (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
        run_id = client.create_run(experiment_id, run_name=f"{BROKEN_TASK}-{base}").info.run_id
        client.log_artifacts(run_id, str(folder), "adapter")
        assert publish_task_card(run_id, task, EvalSettings(), sweep.uri)
        client.set_terminated(run_id)
        registry.register_adapter(run_id, BROKEN_TASK, base, registered_score, uri=sweep.uri)
    registry.update_champion(BROKEN_TASK, sweep.uri)


@pytest.fixture(scope="module")
def site(tiny_sweep: Sweep, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_chromium()
    import ray
    from ray import serve

    from serving.app import deploy
    from serving.config import BaseDeployment, IngressSettings, ServeConfig
    from serving.webapp import page_url

    root = tmp_path_factory.mktemp("web")
    publish_broken_task(tiny_sweep, root)
    config = ServeConfig(name="loraland-web-test", port=free_port(), tracking_uri=tiny_sweep.uri, api_key=API_KEY,
                         adapter_cache_dir=str(root / "cache"),
                         ingress=IngressSettings(num_cpus=0, model_ttl_s=0.5, request_timeout_s=120),
                         deployments=[BaseDeployment(base_model=base, device="cpu", num_cpus=0.5) for base in BASES])
    with pytest.MonkeyPatch.context() as env:  # for this module's Ray only: the processes ray.init starts inherit it
        env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
        ray.init(_node_ip_address="127.0.0.1", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            api = deploy(config)
            yield Site(page_url(api), api, tiny_sweep.uri)
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any, site: Site) -> Iterator[Any]:
    """A fresh tab on the page with the API key entered once; `page.sent` collects the /v1 completion bodies it posts,
    `page.asked` (URL, Authorization header) of every request to the endpoint's API (/v1 and /web/api)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    tab.sent, tab.asked = [], []
    tab.on("request", lambda request: tab.sent.append(json.loads(request.post_data))
           if request.url.endswith("/v1/completions") else None)
    tab.on("request", lambda request: tab.asked.append((request.url, request.headers.get("authorization")))
           if "/v1/" in request.url or "/web/api/" in request.url else None)
    tab.goto(site.url)
    tab.wait_for_selector("#key-form:not([hidden])")  # the endpoint needs a key: the page asks for it first
    tab.fill("#api-key", API_KEY)
    tab.press("#api-key", "Enter")
    tab.wait_for_selector("li[data-task='demo_sentiment']")
    try:
        yield tab
    finally:
        context.close()


def open_task(page: Any, task: str) -> None:
    page.click(f"li[data-task='{task}'] a")
    page.wait_for_function("() => state.example !== null && document.querySelector('#fields textarea').value !== ''")


def run_and_wait(page: Any, container: str, start: Any) -> dict[str, Any]:
    """Call `start()` (a click or a key press) and wait until every answer of this run is in: model id -> cell."""
    page.evaluate(f"() => delete document.querySelector('{container}').dataset.done")
    start()
    page.wait_for_function(f"() => document.querySelector('{container}').dataset.done !== undefined")
    refused = " ".join(page.text_content(s) for s in ("#form-error", "#status") if page.is_visible(s))
    assert not refused, f"the page sent nothing: {refused}"
    return {cell.get_attribute("data-model"): cell for cell in page.query_selector_all(f"{container} .cell")}


def assert_cell_is_the_api_answer(cell: Any, body: dict[str, Any], site: Site, metric: str = "accuracy") -> None:
    """The cell shows exactly the text /v1 answers for its model id and prompt, greedy, with timing and a score."""
    expected = site.complete(body)
    assert expected.status_code == 200, expected.text
    assert cell.get_attribute("data-state") == "done", cell.inner_text()
    assert cell.query_selector(".answer").text_content() == expected.json()["choices"][0]["text"]
    timing = cell.query_selector(".timing").text_content()
    assert "first token" in timing and "tokens/s" in timing, timing
    shown_score = cell.query_selector(".score").text_content()
    assert re.search(rf"{re.escape(metric)} -?\d+\.\d{{3}}", shown_score), cell.inner_text()


@pytest.mark.integration
def test_task_list_to_side_by_side_run_by_keyboard(page: Any, site: Site, tmp_path: Path) -> None:
    task = load_catalog().task("demo_sentiment")
    assert page.is_visible("li[data-task='demo_colors']")
    assert page.text_content(".group:has(li[data-task='demo_sentiment']) h2") == task.category  # grouped by category
    facts = page.text_content("li[data-task='demo_sentiment']")
    assert task.metric in facts and "tiny-llama" in facts and "tiny-mistral" in facts and "lift" in facts, facts
    page.fill("#filter", "rouge")  # demo_colors is the ROUGE task
    assert page.is_hidden("li[data-task='demo_sentiment']") and page.is_visible("li[data-task='demo_colors']")
    page.fill("#filter", "")
    open_task(page, "demo_sentiment")
    assert page.text_content("#task-template") == task.prompt
    assert task.description in page.text_content("#task-description")
    assert task.metric in page.text_content("#task-facts")
    assert page.query_selector("#leaderboard tr.champion .badge") is not None
    assert len(page.query_selector_all("#leaderboard tbody tr")) == len(BASES)
    link = page.get_attribute("#leaderboard tr.champion a", "href")
    assert link is not None and link.startswith(f"{site.tracking}/#/experiments/"), link  # the champion's MLflow run
    page.evaluate("() => { window.shownBefore = state.example; }")
    page.click("#another")  # wait until the page has taken the new example in (its response alone may be unread)
    page.wait_for_function("() => state.example !== window.shownBefore")
    index = page.evaluate("() => state.example.index")
    assert page.input_value("#field-review") == eval_rows(task)[index]["review"]
    page.focus("#field-review")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "run"
    cells = run_and_wait(page, "#side-by-side", lambda: page.keyboard.press("Enter"))
    champion_base = page.evaluate("() => state.task.champion.base_model")
    assert list(cells) == ["demo_sentiment", champion_base]
    assert sorted(body["model"] for body in page.sent) == sorted(cells)
    for body in page.sent:
        cell = cells[body["model"]]
        assert body["prompt"] == prompt_for(task, eval_rows(task)[index], 1500, evaluation=True)
        assert (body["temperature"], body["stream"], body["max_tokens"]) == (0, True, task.max_new_tokens)
        assert_cell_is_the_api_answer(cell, body, site)
    assert page.text_content("#gold-text") == completion_for(task, eval_rows(task)[index])
    assert page.is_hidden("#key-form")  # asked once: never again in this tab
    assert page.asked and all(auth == f"Bearer {API_KEY}" and API_KEY not in url for url, auth in page.asked
                              if "/web/api/settings" not in url), page.asked
    shot = tmp_path / "web_page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("LORALAND_UPDATE_SCREENSHOT") == "1":  # refresh the docs' picture on purpose, never by the way
        shutil.copyfile(shot, SCREENSHOT)


@pytest.mark.integration
def test_compare_all_fills_every_cell(page: Any, site: Site) -> None:
    open_task(page, "demo_sentiment")
    cells = run_and_wait(page, "#compare-grid", lambda: page.click("#compare"))
    every_model = sorted([f"{b}:demo_sentiment" for b in BASES] + list(BASES))
    assert sorted(cells) == sorted(body["model"] for body in page.sent) == every_model
    for body in page.sent:
        assert cells[body["model"]].query_selector("h3 code").text_content() == body["model"]
        assert_cell_is_the_api_answer(cells[body["model"]], body, site)


@pytest.mark.integration
def test_a_broken_adapter_fails_in_its_own_cell_only(page: Any, site: Site) -> None:
    open_task(page, BROKEN_TASK)
    cells = run_and_wait(page, "#compare-grid", lambda: page.click("#compare"))
    assert len(cells) == 4
    broken = cells.pop(f"tiny-mistral:{BROKEN_TASK}")
    assert broken.get_attribute("data-state") == "failed"
    error = broken.query_selector(".error").text_content()
    assert "adapter" in error and "500" in error
    metric = load_catalog().task(BROKEN_TASK).metric
    for body in page.sent:
        if body["model"] in cells:  # the others answer as /v1 does (a tiny model's greedy answer may be empty)
            assert_cell_is_the_api_answer(cells[body["model"]], body, site, metric)


def failing_endpoint(status: int | None) -> Callable[[Any], None]:
    """A Playwright route handler standing in for /v1: an overload error with `status`, or (None) no connection."""
    def handle(route: Any) -> None:  # one parameter: Playwright would pass the request as a second one
        if status is None:
            route.abort()
            return
        error = {"message": "overloaded", "type": "server_error", "param": None, "code": "overloaded"}
        route.fulfill(status=status, headers={"Retry-After": "2"}, content_type="application/json",
                      body=json.dumps({"error": error}))
    return handle


@pytest.mark.integration
def test_bad_input_is_refused_before_sending_and_failures_are_explained(page: Any, site: Site) -> None:
    open_task(page, "demo_sentiment")
    page.fill("#field-review", "   ")
    page.click("#run")
    page.wait_for_selector("#error-review:not([hidden])")
    assert "fill in" in page.text_content("#error-review")
    page.fill("#field-review", "жё " * 600)  # byte-level BPE: several tokens per character, far over 512
    page.click("#run")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "Too long for demo_sentiment" in page.text_content("#form-error")
    assert page.sent == []  # nothing reached /v1
    page.fill("#field-review", "A fine film.")
    for status, expected in ((429, "busy (429)"), (503, "busy (503)"), (None, "does not answer")):
        page.route("**/v1/completions", failing_endpoint(status))
        cells = run_and_wait(page, "#side-by-side", lambda: page.click("#run"))
        assert all(expected in cell.query_selector(".error").text_content() for cell in cells.values()), expected
        page.unroute("**/v1/completions")
    cells = run_and_wait(page, "#side-by-side", lambda: page.click("#run"))  # the page keeps working
    assert all(cell.get_attribute("data-state") == "done" for cell in cells.values())
    assert "not scored" in page.text_content("#side-by-side .score")  # edited input: no gold answer to score against
