"""The LoRA Land page: a static page (`serving/web/`) served at `/` by the same ingress as the OpenAI API,
and the small JSON endpoints it reads under `/web/api/`.

The page is a client of our own public `/v1` API: it sends the same completion requests a program would
(streamed, greedy), so what it shows is what the API answers. What it cannot get from `/v1` comes from
here, computed where the rest of the project computes it:

- the task list: every catalogue task whose champion this endpoint serves, its category, metric, the
  base models fine-tuned on it, the champion's score and lift (`tracking.scores`);
- a task: description, metric, its evaluation prompt template and input fields, a random evaluation
  row as an example with its gold answer (`jobs.data`, `core.prompts`), the model ids to compare, and
  its leaderboard beside the study's published scores (`tracking.scores`);
- the prompt for filled-in fields, rendered as evaluation renders it, with each base model's token
  count against its context (asked of that base's replica, whose tokenizer encodes requests), so the
  page refuses an empty field or an over-long prompt before sending anything;
- an answer's score on the task's metric against the gold answer (`jobs.metrics.score`).

`WebPage` holds the routes; the ingress inherits them (Serve's class-based views follow the MRO).
No `from __future__ import annotations` here: FastAPI reads the route methods' annotations at run time.
"""

import asyncio
import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray.serve.handle import DeploymentHandle

from core.catalog import load_catalog
from core.prompts import CODE_METRIC, completion_for, evaluation_prompt
from core.schemas import EvalSettings, TaskSpec
from jobs.data import Row, eval_rows
from jobs.metrics import score
from serving.adapters import ModelResolver, Published, ServedTasks, adapter_id, resolve
from serving.api import APIError, parse_request
from serving.config import ServeConfig
from tracking import registry, store
from tracking.scores import RunScores, gpt_scores, run_link, run_scores, study_scores

WEB_DIR = Path(__file__).resolve().parent / "web"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}  # what /web/<name> serves besides the page

web_routes = APIRouter()


def page_url(api_url: str) -> str:
    """The page's address from the OpenAI base URL that `serving.app.deploy` returns (`.../v1`)."""
    return api_url.removesuffix("/v1").rstrip("/") + "/"


def config_page_url(config: ServeConfig) -> str:
    """The page's address once `config` is served (`loraland serve CONFIG`)."""
    return f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}/"


# --------------------------------------------------------------------------- tasks and their data


def eval_template(task: TaskSpec) -> str:
    """The template evaluation renders (a task with its own evaluation set uses that set's)."""
    return task.eval.prompt if task.eval else task.prompt


def input_columns(task: TaskSpec) -> list[str]:
    """The columns the evaluation template reads, in the task's column order: one form field each."""
    columns = task.eval.columns if task.eval else task.columns
    used = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(eval_template(task)))
    return [column for column in columns if column in used]


@lru_cache(maxsize=64)
def task_rows(name: str) -> tuple[Row, ...]:
    """The task's evaluation rows (what `jobs.evaluate` scores on), read once per process."""
    return tuple(eval_rows(load_catalog().task(name)))


def field_kinds(task: TaskSpec, rows: tuple[Row, ...]) -> dict[str, str]:
    """Per input column, "text" when its values are strings, else "json" (lists, numbers: edited as JSON)."""
    return {column: "text" if all(isinstance(row.get(column), str) for row in rows[:50]) else "json"
            for column in input_columns(task)}


def field_text(value: Any) -> str:
    """A column's value as its form field shows it."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def gold_answer(task: TaskSpec, row: Row) -> str | None:
    """The gold answer of an evaluation row (None for code tasks: their tests decide)."""
    return None if task.metric == CODE_METRIC else completion_for(task, row)


def example(task: TaskSpec, rows: tuple[Row, ...], index: int) -> dict[str, Any]:
    """Row `index` as the page's form: a text per input column, and the gold answer."""
    row = rows[index]
    return {"index": index, "fields": {column: field_text(row.get(column)) for column in input_columns(task)},
            "gold": gold_answer(task, row)}


def row_from_fields(task: TaskSpec, fields: dict[str, str], kinds: dict[str, str]) -> Row:
    """The row the form describes; a 400 naming the first empty or unreadable field."""
    row: Row = {}
    for column in input_columns(task):
        text = fields.get(column, "")
        if not text.strip():
            raise APIError(400, f"{column}: fill in this field", code="invalid_value", param=f"fields.{column}")
        try:
            row[column] = json.loads(text) if kinds.get(column) == "json" else text
        except ValueError:
            raise APIError(400, f"{column}: expected JSON here (like the example's)", code="invalid_value",
                           param=f"fields.{column}") from None
    return row


def render_prompt(task: TaskSpec, row: Row) -> str:
    """The prompt as `jobs.evaluate` builds it: the evaluation template, cut like evaluation cuts it (code never)."""
    return evaluation_prompt(task, row, EvalSettings())


def answer_score(task: TaskSpec, prediction: str, gold: str) -> float | None:
    """The answer's score on the task's metric as evaluation computes it (on the stripped completion); None for code."""
    return None if task.metric == CODE_METRIC else score(task.metric, task.answer, prediction.strip(), gold, task.labels)


# --------------------------------------------------------------------------- what is served, and how well it scored


def fine_tuned_bases(task: str, published: Published, served: ServedTasks) -> list[str]:
    """The served base models that have an adapter of `task` (`<base>:<task>` resolves)."""
    return [base for base in served if resolve(f"{base}:{task}", published, served) is not None]


def compare_models(task: str, published: Published, served: ServedTasks) -> list[str]:
    """Every model id of "compare all": each fine-tune of the task, then each of those base models."""
    bases = fine_tuned_bases(task, published, served)
    return [f"{base}:{task}" for base in bases] + bases


def served_tasks(published: Published, served: ServedTasks) -> list[TaskSpec]:
    """Catalogue tasks whose champion this endpoint serves, by category then name."""
    catalog = load_catalog()
    tasks = [catalog.tasks[name] for name in published if name in catalog.tasks and resolve(name, published, served)]
    return sorted(tasks, key=lambda task: (task.category, task.name))


def champion_entry(task: str, published: Published, served: ServedTasks, scores: dict[str, RunScores]) -> dict[str, Any]:
    """The task's champion: model id, base model, adapter id, score (its run's, else the registry tag) and lift."""
    route = resolve(task, published, served)
    version = published[task].champion_version()
    assert route is not None and version is not None  # served_tasks keeps only these
    logged = scores.get(version.run_id or "")
    tagged = registry.version_score(version)
    return {"model": task, "base_model": route.base_model, "adapter": route.adapter, "version": str(version.version),
            "score": logged.score if logged and logged.score is not None else (tagged if tagged > float("-inf") else None),
            "lift": logged.lift if logged else None}


def task_summary(task: TaskSpec, published: Published, served: ServedTasks, scores: dict[str, RunScores]) -> dict[str, Any]:
    """One entry of the task list."""
    return {"name": task.name, "category": task.category, "description": task.description, "metric": task.metric,
            "base_models": fine_tuned_bases(task.name, published, served),
            "champion": champion_entry(task.name, published, served, scores)}


def leaderboard(task: str, published: Published, served: ServedTasks, scores: dict[str, RunScores],
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


def context_check(count: tuple[int, int] | None, max_tokens: int) -> dict[str, Any]:
    """Whether prompt + max_tokens fits the context, as the engine checks it (`fits` None when unknown)."""
    tokens, context = count if count is not None else (None, None)
    fits = None if tokens is None or context is None else tokens + max_tokens <= context
    return {"prompt_tokens": tokens, "context": context, "fits": fits}


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
    prediction: str
    gold: str


async def read_body(request: Request, schema: type[BaseModel]) -> Any:
    """The JSON body validated against `schema`; a 400 APIError otherwise."""
    try:
        body = await request.json()
    except ValueError:
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    return parse_request(schema, body)


def known_task(name: str, published: Published, served: ServedTasks) -> TaskSpec:
    """The served task `name`; a 404 APIError naming the served ones otherwise."""
    tasks = served_tasks(published, served)
    found = next((task for task in tasks if task.name == name), None)
    if found is None:
        raise APIError(404, f"no served task {name!r}; served: {', '.join(t.name for t in tasks) or 'none'}",
                       code="not_found", param="task")
    return found


# --------------------------------------------------------------------------- routes


class WebPage:
    """The page and its data routes, mixed into the ingress, which provides the attributes below."""

    resolver: ModelResolver
    servers: dict[str, DeploymentHandle]
    tracking_uri: str
    api_key: str | None

    def authorize(self, request: Request) -> None:
        raise NotImplementedError  # the ingress checks its bearer token

    @web_routes.get("/", include_in_schema=False)
    async def page(self) -> Response:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @web_routes.get("/web/api/settings")
    async def web_settings(self) -> dict[str, Any]:
        """What the page needs before anything else: whether to ask for an API key."""
        return {"api_key_required": self.api_key is not None}

    @web_routes.get("/web/api/tasks")
    async def web_tasks(self, request: Request) -> dict[str, Any]:
        self.authorize(request)
        published, served = await self.resolver.published_view(), self.resolver.served
        tasks = served_tasks(published, served)
        scores = await asyncio.to_thread(run_scores, version_run_ids([t.name for t in tasks], published, served, False),
                                         self.tracking_uri)
        return {"tasks": [task_summary(task, published, served, scores) for task in tasks]}

    @web_routes.get("/web/api/tasks/{task}")
    async def web_task(self, task: str, request: Request) -> dict[str, Any]:
        self.authorize(request)
        published, served = await self.resolver.published_view(), self.resolver.served
        spec = known_task(task, published, served)
        scores = await asyncio.to_thread(run_scores, version_run_ids([task], published, served, True), self.tracking_uri)
        rows, data_error = await self.rows(spec)
        return task_summary(spec, published, served, scores) | {
            "answer": spec.answer, "template": eval_template(spec), "max_tokens": spec.max_new_tokens,
            "fields": [{"name": name, "kind": kind} for name, kind in field_kinds(spec, rows).items()],
            "examples": len(rows), "data_error": data_error, "scored": spec.metric != CODE_METRIC,
            "models": compare_models(task, published, served),
            "leaderboard": leaderboard(task, published, served, scores, self.tracking_uri),
            "tracking_ui": store.is_server_uri(self.tracking_uri)}

    @web_routes.get("/web/api/tasks/{task}/example")
    async def web_example(self, task: str, request: Request) -> dict[str, Any]:
        self.authorize(request)
        spec = known_task(task, await self.resolver.published_view(), self.resolver.served)
        rows, data_error = await self.rows(spec)
        if not rows:
            raise APIError(503, f"no evaluation data for {task}: {data_error or 'the split is empty'}", type="server_error",
                           code="no_data")
        return example(spec, rows, random.randrange(len(rows)))

    @web_routes.post("/web/api/tasks/{task}/prompt")
    async def web_prompt(self, task: str, request: Request) -> dict[str, Any]:
        self.authorize(request)
        spec = known_task(task, await self.resolver.published_view(), self.resolver.served)
        body: PromptRequest = await read_body(request, PromptRequest)
        rows, _ = await self.rows(spec)
        prompt = render_prompt(spec, row_from_fields(spec, body.fields, field_kinds(spec, rows)))
        routes = {model: await self.resolver.resolve(model) for model in body.models}
        bases = sorted({route.base_model for route in routes.values()})
        counts = dict(zip(bases, await asyncio.gather(*(self.count_tokens(base, prompt) for base in bases))))
        return {"prompt": prompt,
                "checks": {model: context_check(counts[route.base_model], body.max_tokens) for model, route in routes.items()}}

    @web_routes.post("/web/api/tasks/{task}/score")
    async def web_score(self, task: str, request: Request) -> dict[str, Any]:
        self.authorize(request)
        spec = known_task(task, await self.resolver.published_view(), self.resolver.served)
        body: ScoreRequest = await read_body(request, ScoreRequest)
        return {"metric": spec.metric, "score": answer_score(spec, body.prediction, body.gold)}

    @web_routes.get("/web/{asset}", include_in_schema=False)
    async def asset(self, asset: str) -> Response:
        if asset not in ASSETS:
            raise APIError(404, f"no such file: /web/{asset}", code="not_found")
        return FileResponse(WEB_DIR / asset, media_type=ASSETS[asset], headers={"Cache-Control": "no-cache"})

    async def rows(self, task: TaskSpec) -> tuple[tuple[Row, ...], str | None]:
        """The task's evaluation rows, or none and why (an offline cluster without the dataset, say)."""
        try:
            return await asyncio.to_thread(task_rows, task.name), None
        except Exception as error:
            return (), f"{type(error).__name__}: {str(error)[:300]}"

    async def count_tokens(self, base_model: str, prompt: str) -> tuple[int, int] | None:
        """(prompt tokens as a completion request encodes them, context) from the base's replica; None if it cannot say."""
        try:
            return await asyncio.wait_for(self.servers[base_model].prompt_tokens.remote(prompt), 30)
        except Exception:
            return None
