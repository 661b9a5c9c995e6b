"""The LoRA Land page's data (serving/webapp.py) and the task cards it reads (tracking/cards.py).

Unit tests check the page's data against the code it must agree with (evaluation's prompts and scores, the resolver's
model ids), and the routes `page_routes` builds, on a plain FastAPI app (no Ray): their keys, and that they read only
the task cards, registry view and token counter they are given. An integration test reads the card each train run of
the tiny sweep published. The page itself, in a browser against the real app: tests/test_web.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.catalog import load_catalog
from core.prompts import completion_for, prompt_for
from core.schemas import EvalSettings
from jobs.data import eval_rows
from jobs.metrics import score
from serving.api import APIError
from tests.test_serving import version
from tests.tracking_fixtures import Sweep
from tracking.cards import CARD_EXAMPLES, TaskCard, input_columns, task_card
from tracking.registry import TaskAdapters

API_KEY = "web-data-test-key"


def card_of(name: str) -> TaskCard:
    """The card a train job of the shipped task `name` publishes (its default evaluation settings)."""
    task = load_catalog().task(name)
    return task_card(task, eval_rows(task, CARD_EXAMPLES), EvalSettings())


@pytest.mark.unit
@pytest.mark.parametrize("name", ["demo_sentiment", "demo_colors", "demo_similarity", "demo_arithmetic"])
def test_card_example_renders_the_prompt_evaluation_sends_and_scores_like_it(name: str) -> None:
    from serving.webapp import answer_score, render_prompt, row_from_fields

    card = card_of(name)
    task, rows = card.task, eval_rows(card.task)
    assert [example.index for example in card.examples] == list(range(CARD_EXAMPLES))
    shown = card.examples[3]
    assert set(shown.fields) == set(input_columns(task)) < set(task.columns)  # the gold is no input
    assert card.template == task.prompt and card.max_tokens == task.max_new_tokens
    row = row_from_fields(card, shown.fields)
    assert render_prompt(card, row) == prompt_for(task, rows[3], 1500, evaluation=True)
    assert shown.gold == completion_for(task, rows[3])
    expected = score(task.metric, task.answer, shown.gold, shown.gold, task.labels)
    assert answer_score(task, f"  {shown.gold}\n", shown.gold) == expected == 1.0
    assert TaskCard.model_validate_json(card.model_dump_json()) == card  # what the run's artifact holds reads back


@pytest.mark.unit
def test_empty_or_unreadable_fields_are_refused_naming_the_field() -> None:
    from serving.webapp import row_from_fields

    card = card_of("demo_similarity")
    with pytest.raises(APIError) as empty:
        row_from_fields(card, {"sentence1": "a cat", "sentence2": "  "})
    assert (empty.value.status, empty.value.param) == (400, "fields.sentence2")
    card.fields[1].kind = "json"
    with pytest.raises(APIError) as unreadable:
        row_from_fields(card, {"sentence1": "a", "sentence2": "[1,"})
    assert unreadable.value.param == "fields.sentence2" and "JSON" in unreadable.value.message


def published_sentiment() -> dict[str, TaskAdapters]:
    """demo_sentiment on three bases (v2 on tiny-mistral the champion; tiny-gemma not served), demo_colors only on
    tiny-gemma, and a task whose champion run published no card."""
    versions = [version("demo_sentiment", 1, "tiny-llama", 0.8), version("demo_sentiment", 2, "tiny-mistral", 0.9),
                version("demo_sentiment", 3, "tiny-gemma", 0.95)]
    for number, item in enumerate(versions, 1):
        item._run_id = f"run{number}"
    colors, uncarded = version("demo_colors", 1, "tiny-gemma", 0.5), version("no_card", 1, "tiny-llama", 0.5)
    colors._run_id, uncarded._run_id = "colors1", "nocard1"
    return {"demo_sentiment": TaskAdapters("demo_sentiment", versions, champion="2"),
            "demo_colors": TaskAdapters("demo_colors", [colors], champion="1"),
            "no_card": TaskAdapters("no_card", [uncarded], "1")}


SERVED: dict[str, frozenset[str] | None] = {"tiny-llama": None, "tiny-mistral": None}
RUN_CARDS = {"run1": "demo_sentiment", "run2": "demo_sentiment", "colors1": "demo_colors"}


@pytest.mark.unit
def test_task_list_compare_models_and_leaderboard_follow_the_resolver() -> None:
    from serving.webapp import compare_models, context_check, leaderboard, page_url, served_cards, task_summary
    from tracking.scores import RunScores

    published = published_sentiment()
    cards = {run_id: card_of(task) for run_id, task in RUN_CARDS.items()}
    assert [card.task.name for card in served_cards(published, SERVED, cards.get)] == ["demo_sentiment"]
    cards["run2"] = card_of("demo_colors")  # a champion's card of another task is no card of this one
    assert served_cards(published, SERVED, cards.get) == []
    assert compare_models("demo_sentiment", published, SERVED) == [
        "tiny-llama:demo_sentiment", "tiny-mistral:demo_sentiment", "tiny-llama", "tiny-mistral"]
    scores = {"run1": RunScores("run1", "7", 0.8, 0.5, 0.3), "run2": RunScores("run2", "7", 0.9, 0.4, 0.5)}
    summary = task_summary(load_catalog().task("demo_sentiment"), published, SERVED, scores)
    assert summary["champion"] == {"model": "demo_sentiment", "base_model": "tiny-mistral",
                                   "adapter": "loraland-demo_sentiment/2", "version": "2", "score": 0.9, "lift": 0.5}
    board = leaderboard("demo_sentiment", published, SERVED, scores, "http://127.0.0.1:5000/")
    assert [(r["base_model"], r["champion"], r["zero_shot"], r["lift"]) for r in board] == [
        ("tiny-mistral", True, 0.4, 0.5), ("tiny-llama", False, 0.5, 0.3)]
    assert board[0]["run_url"] == "http://127.0.0.1:5000/#/experiments/7/runs/run2"
    assert leaderboard("demo_sentiment", published, SERVED, scores, "sqlite:////tmp/x.db")[0]["run_url"] is None
    assert context_check((500, 512), 16) == {"prompt_tokens": 500, "context": 512, "fits": False}
    assert context_check(None, 16)["fits"] is None
    assert page_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/"


@pytest.mark.unit
def test_page_routes_need_a_key_and_read_only_what_they_are_given(tmp_path: Path) -> None:
    """The routes the factory builds, on a plain FastAPI app (no Ray): every data route but settings answers 401
    without the key; with it, tasks, examples and prompt checks come from the cards and the token counter given."""
    from fastapi.testclient import TestClient

    from serving.adapters import ModelResolver
    from serving.api import openai_app
    from serving.auth import KeyRing
    from serving.webapp import PageSources, page_routes

    cards = {run_id: card_of(task) for run_id, task in RUN_CARDS.items()}
    counted: list[tuple[str, str]] = []

    async def count_tokens(base_model: str, prompt: str) -> tuple[int, int] | None:
        counted.append((base_model, prompt))
        return (len(prompt), 512) if base_model == "tiny-mistral" else None

    resolver = ModelResolver(SERVED, published_sentiment, ttl_s=60, timeout_s=5)
    app = openai_app()
    app.include_router(page_routes(PageSources(resolver, KeyRing.from_settings(API_KEY, None), cards.get,
                                               count_tokens, f"sqlite:///{tmp_path / 'none.db'}")))
    client = TestClient(app)
    key = {"Authorization": f"Bearer {API_KEY}"}
    assert client.get("/web/api/settings").json() == {"api_key_required": True}
    assert client.get("/").status_code == 200 and client.get("/web/app.js").status_code == 200
    task_routes = ["/web/api/tasks", "/web/api/tasks/demo_sentiment", "/web/api/tasks/demo_sentiment/example"]
    for path in task_routes:
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401, path
    for path in ("/web/api/tasks/demo_sentiment/prompt", "/web/api/tasks/demo_sentiment/score"):
        assert client.post(path, json={}).status_code == 401, path
    listed = client.get("/web/api/tasks", headers=key).json()["tasks"]
    assert [task["name"] for task in listed] == ["demo_sentiment"]  # demo_colors: not served; no_card: no card
    detail = client.get("/web/api/tasks/demo_sentiment", headers=key).json()
    card = cards["run2"]  # the champion's
    assert (detail["template"], detail["fields"], detail["examples"]) == (
        card.template, [{"name": "review", "kind": "text"}], CARD_EXAMPLES)
    example = client.get("/web/api/tasks/demo_sentiment/example", headers=key).json()
    assert example == card.examples[example["index"]].model_dump()
    missing = client.get("/web/api/tasks/no_card", headers=key)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "task"
    checked = client.post("/web/api/tasks/demo_sentiment/prompt", headers=key, json={
        "fields": example["fields"], "models": ["demo_sentiment", "tiny-llama"], "max_tokens": 8}).json()
    assert checked["prompt"] == prompt_for(card.task, eval_rows(card.task)[example["index"]], 1500, evaluation=True)
    assert checked["checks"] == {"demo_sentiment": context_check_of(len(checked["prompt"]), 512, 8),
                                 "tiny-llama": {"prompt_tokens": None, "context": None, "fits": None}}
    assert sorted(counted) == [("tiny-llama", checked["prompt"]), ("tiny-mistral", checked["prompt"])]
    bad = client.post("/web/api/tasks/demo_sentiment/prompt", headers=key, content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    scored = client.post("/web/api/tasks/demo_sentiment/score", headers=key,
                         json={"prediction": example["gold"], "gold": example["gold"]}).json()
    assert scored == {"metric": card.task.metric, "score": 1.0}


def context_check_of(tokens: int, context: int, max_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": tokens, "context": context, "fits": tokens + max_tokens <= context}


@pytest.mark.unit
def test_study_scores_come_from_the_reference_table() -> None:
    from tracking.scores import gpt_scores, study_scores

    assert study_scores()[("glue_sst2", "mistral-7b")].finetuned_score is not None
    gpt35, gpt4 = gpt_scores("glue_sst2")
    assert gpt35 is not None and gpt4 is not None
    assert gpt_scores("demo_sentiment") == (None, None)


@pytest.mark.integration
def test_a_run_logs_its_worked_examples_and_its_card_renders_the_prompts_it_evaluated(mlflow_server: Any,
                                                                                    tmp_path: Path) -> None:
    """A job of a task with worked examples (viggo on its fixture: its first two rows) keeps the rows in result.json,
    logs their count and digest, and publishes them in its task card: the page renders the job's own prompts."""
    from core.prompts import examples_digest
    from jobs.evaluate import prepare_evaluation, score_evaluation
    from jobs.result import JobResult
    from jobs.run import RESULT_FILE, claim_output, record_result
    from jobs.storage import JobStorage
    from jobs.train import TrainResult
    from serving.webapp import render_prompt
    from tests.helpers import tiny_job
    from tests.test_study_fidelity import _on_fixture, _rows
    from tracking import store
    from tracking.cards import read_task_card
    from tracking.tracker import JobTracker

    task, settings = _on_fixture("viggo"), EvalSettings(limit=3)
    first = [{column: row[column] for column in task.columns} for row in _rows("viggo")[:2]]
    job = tiny_job(tmp_path / "job").model_copy(update={"task": task, "evaluation": settings,
                                                        "job_key": "worked/tiny-llama/viggo/train-0"})
    evaluation = score_evaluation(prepare_evaluation(task, settings), ["a", "b", "c"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    storage = JobStorage(job.output_dir)
    claim_output(storage, job)
    result = record_result(job, storage, evaluation, TrainResult(str(adapter), {}, []))
    assert JobResult.load(Path(job.output_dir) / RESULT_FILE).worked_examples == first
    experiment_id = store.ensure_experiment("worked-examples", mlflow_server.uri)
    with JobTracker.for_job(job, experiment_id, uri=mlflow_server.uri, system_metrics=False, register=False) as tracker:
        run_id = tracker.finish(result)
    params = store.client(mlflow_server.uri).get_run(run_id).data.params
    assert (params["task.worked_examples"], params["task.worked_examples_digest"]) == ("2", examples_digest(first))
    card = read_task_card(run_id, mlflow_server.uri)
    assert card is not None and card.worked_examples == first
    rows = eval_rows(task, 3)
    assert [render_prompt(card, row) for row in rows] == [p["prompt"] for p in evaluation.predictions]


@pytest.mark.integration
def test_train_runs_publish_their_task_card_and_each_is_read_once(tiny_sweep: Sweep) -> None:
    from tracking.cards import TaskCards, read_task_card

    job = tiny_sweep.job("train", "tiny-llama", "demo_sentiment")
    task, settings = job.config.task, job.config.evaluation
    card = read_task_card(job.run_id, tiny_sweep.uri)
    assert card == task_card(task, eval_rows(task, min(CARD_EXAMPLES, settings.limit)), settings)  # the job's own
    assert card is not None and len(card.examples) == settings.limit < CARD_EXAMPLES
    base_run = tiny_sweep.job("evaluate_base", "tiny-llama", "demo_sentiment").run_id
    reads: list[str] = []

    def read(run_id: str, uri: str) -> TaskCard | None:
        reads.append(run_id)
        return read_task_card(run_id, uri)

    cards = TaskCards(tiny_sweep.uri, miss_ttl_s=600, read=read)
    assert [cards(job.run_id), cards(job.run_id), cards(base_run), cards(base_run)] == [card, card, None, None]
    assert reads == [job.run_id, base_run]  # a card for good, a miss until miss_ttl_s
