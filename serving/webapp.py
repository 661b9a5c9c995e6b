"""The LoRA Land page: a static page (`serving/web/`) served at `/` beside the OpenAI API, and the small JSON
endpoints it reads under `/web/api/`.

The page is a client of our own public `/v1` API: it sends the same completion requests a program would
(streamed, greedy), so what it shows is what the API answers. What it cannot get from `/v1` comes from what
tracking published, computed where the rest of the project computes it:

- the task list: every task whose champion this endpoint serves and whose champion's run published a task card
  (`tracking.cards`): its category, metric, the base models fine-tuned on it, the champion's score and lift
  (`tracking.scores`);
- a task: the card's description, metric, evaluation template and input fields, an example drawn from the card's
  evaluation rows with its gold answer, the model ids to compare, and its leaderboard beside the study's published
  scores (`tracking.scores`);
- the prompt for filled-in fields, rendered as the job's evaluation rendered it (`core.prompts`, the card's
  settings), with each base model's token count against its context (through the counter the ingress hands over),
  so the page refuses an empty field or an over-long prompt before sending anything;
- an answer's score on the task's metric against the gold answer (`jobs.metrics.score`).

`page_routes(sources)` builds the routes from what it is given (`PageSources`: the resolver, the key ring, the task
cards, a token counter, the tracking URI); the ingress builds them once per replica, when Serve asks it for its
ASGI app (`OpenAIIngress.__serve_build_asgi_app__`), and includes them beside its own. A function rather than a
Serve deployment of its own: the page shares the ingress's port, route prefix, registry view and keys, and a second
deployment would need its own application and route prefix for no gain. Every data route but `settings` needs a
valid key when a key is configured (`KeyRing.authenticate`), and applies the key's model scope exactly as `/v1` does
(`serving.auth.visible_cards`): a task is listed, shown, scored or checked only when the key may use its champion id,
its leaderboard and model ids are cut to the ids the key may use, and a 404 lists only tasks in scope. The score route
runs the metric (ROUGE-L is quadratic, in pure Python) on capped text in a small thread pool, off the event loop that
also serves `/v1`.

No `from __future__ import annotations` here: FastAPI reads the routes' annotations at run time.
"""

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from core.prompts import CODE_METRIC, evaluation_prompt
from core.schemas import TaskSpec
from jobs.metrics import score
from serving.adapters import ModelResolver, Published, ServedTasks, adapter_id, resolve
from serving.api import MAX_PROMPT_CHARS, APIError, json_body, read_body
from serving.auth import Caller, KeyRing, resolve_in_scope, visible_cards
from serving.config import ServeConfig
from tracking import registry, store
from tracking.cards import TaskCard
from tracking.scores import RunScores, gpt_scores, run_link, run_scores, study_scores

WEB_DIR = Path(__file__).resolve().parent / "web"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}  # what /web/<name> serves besides the page
MAX_SCORE_CHARS = 10_000  # an answer or gold answer to score: ROUGE-L takes about a second at this length
SCORING = ThreadPoolExecutor(max_workers=2, thread_name_prefix="page-score")  # scores off the ingress's event loop

Row = dict[str, Any]
TokenCounter = Callable[[str, str], Awaitable[tuple[int, int] | None]]  # (base model, prompt) -> (tokens, context)
CardReader = Callable[[str], TaskCard | None]  # run id -> its task card
Scores = dict[str, RunScores]  # run id -> what it logged


def page_url(api_url: str) -> str:
    """The page's address from the OpenAI base URL that `serving.app.deploy` returns (`.../v1`)."""
    return api_url.removesuffix("/v1").rstrip("/") + "/"


def config_page_url(config: ServeConfig) -> str:
    """The page's address once `config` is served (`loraland serve CONFIG`)."""
    return f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}/"


# --------------------------------------------------------------------------- the form


def row_from_fields(card: TaskCard, fields: dict[str, str]) -> Row:
    """The row the form describes; a 400 naming the first empty or unreadable field."""
    row: Row = {}
    for field in card.fields:
        text = fields.get(field.name, "")
        if not text.strip():
            raise APIError(400, f"{field.name}: fill in this field", code="invalid_value", param=f"fields.{field.name}")
        try:
            row[field.name] = json.loads(text) if field.kind == "json" else text
        except ValueError:
            raise APIError(400, f"{field.name}: expected JSON here (like the example's)", code="invalid_value",
                           param=f"fields.{field.name}") from None
    return row


def render_prompt(card: TaskCard, row: Row) -> str:
    """The prompt as the job's evaluation built it: the evaluation template with the worked examples the job showed,
    cut as its settings say (code never)."""
    return evaluation_prompt(card.task, row, card.evaluation, card.worked_examples)


def answer_score(task: TaskSpec, prediction: str, gold: str) -> float | None:
    """The answer's score on the task's metric as evaluation computes it (on the stripped completion); None for code."""
    if task.metric == CODE_METRIC:
        return None
    return score(task.metric, task.answer, prediction.strip(), gold, task.labels)


def context_check(count: tuple[int, int] | None, max_tokens: int) -> dict[str, Any]:
    """Whether prompt + max_tokens fits the context, as the engine checks it (`fits` None when unknown)."""
    tokens, context = count if count is not None else (None, None)
    fits = None if tokens is None or context is None else tokens + max_tokens <= context
    return {"prompt_tokens": tokens, "context": context, "fits": fits}


# --------------------------------------------------------------------------- what is served, and how well it scored


def fine_tuned_bases(task: str, published: Published, served: ServedTasks) -> list[str]:
    """The served base models that have an adapter of `task` (`<base>:<task>` resolves)."""
    return [base for base in served if resolve(f"{base}:{task}", published, served) is not None]


def compare_models(task: str, published: Published, served: ServedTasks) -> list[str]:
    """Every model id of "compare all": each fine-tune of the task, then each of those base models."""
    bases = fine_tuned_bases(task, published, served)
    return [f"{base}:{task}" for base in bases] + bases


def served_cards(published: Published, served: ServedTasks, card_of: CardReader) -> list[TaskCard]:
    """The cards of the tasks whose champion this endpoint serves, as their champion's run published them (a task
    whose champion has no card of that task is left out), by category then name. `card_of` blocks (run id -> card)."""
    cards = []
    for task, adapters in published.items():
        champion = adapters.champion_version()
        if champion is None or not champion.run_id or resolve(task, published, served) is None:
            continue
        card = card_of(champion.run_id)
        if card is not None and card.task.name == task:
            cards.append(card)
    return sorted(cards, key=lambda card: (card.task.category, card.task.name))


def known_card(name: str, cards: list[TaskCard]) -> TaskCard:
    """The served task `name`'s card; a 404 APIError naming the served ones otherwise."""
    found = next((card for card in cards if card.task.name == name), None)
    if found is None:
        served = ", ".join(card.task.name for card in cards) or "none"
        raise APIError(404, f"no served task {name!r} (with a published task card); served: {served}",
                       code="not_found", param="task")
    return found


def champion_entry(task: str, published: Published, served: ServedTasks, scores: Scores) -> dict[str, Any]:
    """The task's champion: model id, base model, adapter id, score (its run's, else the registry tag) and lift."""
    route = resolve(task, published, served)
    version = published[task].champion_version()
    assert route is not None and version is not None  # served_cards keeps only these
    logged = scores.get(version.run_id or "")
    tagged = registry.version_score(version)
    score = logged.score if logged and logged.score is not None else (tagged if tagged > float("-inf") else None)
    return {"model": task, "base_model": route.base_model, "adapter": route.adapter, "version": str(version.version),
            "score": score, "lift": logged.lift if logged else None}


def task_summary(task: TaskSpec, published: Published, served: ServedTasks, scores: Scores) -> dict[str, Any]:
    """One entry of the task list."""
    return {"name": task.name, "category": task.category, "description": task.description, "metric": task.metric,
            "base_models": fine_tuned_bases(task.name, published, served),
            "champion": champion_entry(task.name, published, served, scores)}


def leaderboard(task: str, published: Published, served: ServedTasks, scores: Scores,
                tracking_uri: str) -> list[dict[str, Any]]:
    """Per fine-tuned base model: zero-shot, fine-tuned, lift, the study's two scores and GPT-3.5/GPT-4's, the
    champion marked, the run's MLflow UI address (None for a store without one); best fine-tuned first."""
    study, (gpt35, gpt4) = study_scores(), gpt_scores(task)
    champion = published[task].champion
    rows = []
    for base in fine_tuned_bases(task, published, served):
        version = published[task].for_base(base)
        assert version is not None
        logged = scores.get(version.run_id or "")
        reference = study.get((task, base))
        rows.append({
            "base_model": base, "model": f"{base}:{task}", "adapter": adapter_id(task, version.version),
            "zero_shot": logged.base_score if logged else None, "finetuned": logged.score if logged else None,
            "lift": logged.lift if logged else None,
            "study_zero_shot": reference.base_score if reference else None,
            "study_finetuned": reference.finetuned_score if reference else None, "gpt35": gpt35, "gpt4": gpt4,
            "champion": str(version.version) == champion, "run_id": version.run_id,
            "run_url": run_link(tracking_uri, logged.experiment_id, logged.run_id) if logged else None})
    return sorted(rows, key=lambda row: -(row["finetuned"] if row["finetuned"] is not None else float("-inf")))


def version_run_ids(tasks: list[str], published: Published, served: ServedTasks, every_base: bool) -> list[str]:
    """The run ids behind the tasks' champions (and, with `every_base`, behind each base's adapter)."""
    versions = []
    for task in tasks:
        versions.append(published[task].champion_version())
        if every_base:
            versions += [published[task].for_base(base) for base in fine_tuned_bases(task, published, served)]
    return [version.run_id for version in versions if version is not None and version.run_id]


def task_detail(card: TaskCard, published: Published, served: ServedTasks, scores: Scores,
                tracking_uri: str) -> dict[str, Any]:
    """GET /web/api/tasks/{task}: the list entry, and what the task's page shows and asks."""
    task = card.task
    return task_summary(task, published, served, scores) | {
        "answer": task.answer, "template": card.template, "max_tokens": card.max_tokens,
        "fields": [field.model_dump() for field in card.fields], "examples": len(card.examples),
        "data_error": None if card.examples else "the task card holds no evaluation rows",
        "scored": task.metric != CODE_METRIC, "models": compare_models(task.name, published, served),
        "leaderboard": leaderboard(task.name, published, served, scores, tracking_uri),
        "tracking_ui": store.is_server_uri(tracking_uri)}


# --------------------------------------------------------------------------- request bodies


class PromptRequest(BaseModel):
    """POST /web/api/tasks/{task}/prompt: the form's fields, and the model ids about to be asked."""

    model_config = ConfigDict(extra="forbid")
    fields: dict[str, str] = Field(description="Input column -> the text in its form field.")
    models: list[str] = Field(default_factory=list, max_length=64, description="Model ids whose context to check.")
    max_tokens: int = Field(default=16, ge=1, description="What the page will ask for as max_tokens.")


class ScoreRequest(BaseModel):
    """POST /web/api/tasks/{task}/score: an answer and the example's gold answer."""

    model_config = ConfigDict(extra="forbid")
    prediction: str = Field(max_length=MAX_SCORE_CHARS, description=f"At most {MAX_SCORE_CHARS} characters.")
    gold: str = Field(max_length=MAX_SCORE_CHARS, description=f"At most {MAX_SCORE_CHARS} characters.")


def in_scope(detail: dict[str, Any], visible: Collection[str]) -> dict[str, Any]:
    """A task's page data cut to the model ids `visible` (what the caller's key may use)."""
    task = detail["name"]
    return detail | {"base_models": [base for base in detail["base_models"] if f"{base}:{task}" in visible],
                     "models": [model for model in detail["models"] if model in visible],
                     "leaderboard": [row for row in detail["leaderboard"] if row["model"] in visible]}


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class PageSources:
    """What the page reads, handed over by the ingress."""

    resolver: ModelResolver  # the ingress's view of the registry
    keys: KeyRing  # who may read the data routes
    cards: CardReader  # run id -> the task card it published (blocking: `tracking.cards.TaskCards`)
    count_tokens: TokenCounter  # (base model, prompt) -> (prompt tokens, context) from its replica; None if unknown
    tracking_uri: str  # where runs' scores are read, and their MLflow UI links point

    def authorize(self, request: Request) -> Caller:
        """The caller (its key's scope); 401 unless the request carries a configured key (none needed when none is
        configured)."""
        return self.keys.authenticate(request.headers.get("authorization"))

    async def visible(self, caller: Caller) -> set[str]:
        """The model ids `caller` may use, as `/v1/models` lists them."""
        return {str(card["id"]) for card in visible_cards(await self.resolver.cards(), caller)}

    async def view(self, caller: Caller) -> tuple[Published, ServedTasks, list[TaskCard], set[str]]:
        """The registry as the resolver last read it, what is served, the cards of the served tasks whose champion
        `caller` may use, and the model ids it may use."""
        published, served = await self.resolver.published_view(), self.resolver.served
        visible = await self.visible(caller)
        cards = await asyncio.to_thread(served_cards, published, served, self.cards)
        return published, served, [card for card in cards if card.task.name in visible], visible

    async def scores(self, run_ids: list[str]) -> Scores:
        return await asyncio.to_thread(run_scores, run_ids, self.tracking_uri)


def page_routes(sources: PageSources) -> APIRouter:
    """The page at `/`, its assets under `/web/`, its data under `/web/api/`, reading only `sources`."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @router.get("/web/api/settings")
    async def web_settings() -> dict[str, Any]:
        """What the page needs before anything else: whether to ask for an API key."""
        return {"api_key_required": sources.keys.required}

    json_only = not sources.keys.required  # without keys, a cross-site form POST must not pass for JSON

    @router.get("/web/api/tasks")
    async def web_tasks(request: Request) -> dict[str, Any]:
        published, served, cards, visible = await sources.view(sources.authorize(request))
        scores = await sources.scores(version_run_ids([card.task.name for card in cards], published, served, False))
        summaries = [task_summary(card.task, published, served, scores) for card in cards]
        return {"tasks": [summary | {"base_models": [base for base in summary["base_models"]
                                                     if f"{base}:{summary['name']}" in visible]}
                          for summary in summaries]}

    @router.get("/web/api/tasks/{task}")
    async def web_task(task: str, request: Request) -> dict[str, Any]:
        published, served, cards, visible = await sources.view(sources.authorize(request))
        card = known_card(task, cards)
        scores = await sources.scores(version_run_ids([task], published, served, True))
        return in_scope(task_detail(card, published, served, scores, sources.tracking_uri), visible)

    @router.get("/web/api/tasks/{task}/example")
    async def web_example(task: str, request: Request) -> dict[str, Any]:
        card = known_card(task, (await sources.view(sources.authorize(request)))[2])
        if not card.examples:
            raise APIError(503, f"no evaluation rows in {task}'s task card", type="server_error", code="no_data")
        return random.choice(card.examples).model_dump()

    @router.post("/web/api/tasks/{task}/prompt", openapi_extra=json_body(PromptRequest))
    async def web_prompt(task: str, request: Request) -> dict[str, Any]:
        caller = sources.authorize(request)
        card = known_card(task, (await sources.view(caller))[2])
        body = await read_body(request, PromptRequest, json_only)
        prompt = render_prompt(card, row_from_fields(card, body.fields))
        if len(prompt) > MAX_PROMPT_CHARS:
            raise APIError(400, f"fields: the prompt holds {len(prompt)} characters; the cap is {MAX_PROMPT_CHARS}",
                           code="invalid_value", param="fields")
        routes = {model: await resolve_in_scope(sources.resolver, caller, model) for model in body.models}
        bases = sorted({route.base_model for route in routes.values()})
        counts = dict(zip(bases, await asyncio.gather(*(sources.count_tokens(base, prompt) for base in bases))))
        checks = {model: context_check(counts[route.base_model], body.max_tokens) for model, route in routes.items()}
        return {"prompt": prompt, "checks": checks}

    @router.post("/web/api/tasks/{task}/score", openapi_extra=json_body(ScoreRequest))
    async def web_score(task: str, request: Request) -> dict[str, Any]:
        card = known_card(task, (await sources.view(sources.authorize(request)))[2])
        body = await read_body(request, ScoreRequest, json_only)
        loop = asyncio.get_running_loop()
        scored = await loop.run_in_executor(SCORING, answer_score, card.task, body.prediction, body.gold)
        return {"metric": card.task.metric, "score": scored}

    @router.get("/web/{asset}", include_in_schema=False)
    async def asset(asset: str) -> Response:
        if asset not in ASSETS:
            raise APIError(404, f"no such file: /web/{asset}", code="not_found")
        return FileResponse(WEB_DIR / asset, media_type=ASSETS[asset], headers={"Cache-Control": "no-cache"})

    return router
