"""Task cards: what a served task's page needs to know about the task, published with each train run, so that
serving never loads a dataset nor re-reads the catalogue to show a task.

A card holds the job's own task (its `TaskSpec`: templates, metric, answer parsing, labels, category, description,
max tokens), the evaluation settings its prompts were cut with, the worked examples its prompts showed (the task's
first training rows, as the job read them: the page renders the job's prompt without the training data), the input
fields the evaluation template reads with their kind ("text", or "json" for lists and numbers, edited as JSON), and the
first `CARD_EXAMPLES` evaluation rows as those fields' texts with their gold answers (the example index is the row's
index in the evaluation set).

It is the train run's `task_card.json` artifact, logged by the job's tracker before the adapter is registered. A
finished run's artifacts do not change, so `TaskCards` keeps every card it read for good (a missing one is asked
again after `miss_ttl_s`).
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.meta
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.prompts import CODE_METRIC, Examples, completion_for, worked_examples
from core.schemas import EvalSettings, TaskSpec
from tracking import store
from tracking.retry import call_with_retry

log = logging.getLogger(__name__)

CARD_FILE = "task_card.json"
CARD_EXAMPLES = 20  # evaluation rows a card carries for the page's "Another example"

Row = dict[str, Any]
FieldKind = Literal["text", "json"]


class CardField(BaseModel):
    """One input column of the evaluation template: one form field."""

    model_config = ConfigDict(extra="forbid")
    name: str
    kind: FieldKind = Field(description="text: the value is a string; json: edited as JSON (lists, numbers).")


class CardExample(BaseModel):
    """An evaluation row as the page's form shows it."""

    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0, description="The row's index in the task's evaluation set.")
    fields: dict[str, str] = Field(description="Input column -> its text in the form.")
    gold: str | None = Field(description="The gold answer; None for a code task (its tests decide).")


class TaskCard(BaseModel):
    """What a train run publishes about its task for the page."""

    model_config = ConfigDict(extra="forbid")
    task: TaskSpec
    evaluation: EvalSettings = Field(description="How the job's evaluation cut prompts and how many tokens it asked.")
    worked_examples: list[Row] = Field(default_factory=list, description="The rows the job's prompts showed as worked "
                                       "examples (`task.worked_examples` first training rows).")
    fields: list[CardField]
    examples: list[CardExample]

    @property
    def template(self) -> str:
        return eval_template(self.task)

    @property
    def kinds(self) -> dict[str, FieldKind]:
        return {field.name: field.kind for field in self.fields}

    @property
    def max_tokens(self) -> int:
        """The generation budget the job's evaluation used."""
        return self.evaluation.max_new_tokens or self.task.max_new_tokens


# --------------------------------------------------------------------------- building a card


def eval_template(task: TaskSpec) -> str:
    """The template evaluation renders (a task with its own evaluation set uses that set's)."""
    return task.eval.prompt if task.eval else task.prompt


def input_columns(task: TaskSpec) -> list[str]:
    """The columns the evaluation template reads, in the task's column order: one form field each."""
    columns = task.eval.columns if task.eval else task.columns
    used = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(eval_template(task)))
    return [column for column in columns if column in used]


def field_kinds(task: TaskSpec, rows: Sequence[Row]) -> dict[str, FieldKind]:
    """Per input column, "text" when its values are strings, else "json"."""
    return {column: "text" if all(isinstance(row.get(column), str) for row in rows) else "json"
            for column in input_columns(task)}


def field_text(value: Any) -> str:
    """A column's value as its form field shows it."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def gold_answer(task: TaskSpec, row: Row) -> str | None:
    """The gold answer of an evaluation row (None for code tasks: their tests decide)."""
    return None if task.metric == CODE_METRIC else completion_for(task, row)


def task_card(task: TaskSpec, rows: Sequence[Row], settings: EvalSettings, worked: Examples = ()) -> TaskCard:
    """The card of `task` from its first evaluation rows (`rows[i]` is row i of the evaluation set) and the worked
    examples its job's prompts showed (a NotFound when the task shows more than `worked` holds)."""
    worked_examples(task, worked)  # the page must never render the task's prompt without them
    columns = input_columns(task)
    examples = [CardExample(index=index, fields={column: field_text(row.get(column)) for column in columns},
                            gold=gold_answer(task, row)) for index, row in enumerate(rows[:CARD_EXAMPLES])]
    kinds = field_kinds(task, rows[:CARD_EXAMPLES])
    return TaskCard(task=task, evaluation=settings, worked_examples=[dict(r) for r in worked[: task.worked_examples]],
                    fields=[CardField(name=c, kind=kinds[c]) for c in columns], examples=examples)


def evaluation_settings(params: dict[str, Any]) -> EvalSettings:
    """The evaluation settings among a job's flattened params (`evaluation.prompt_max_chars`, ...; `jobs.result`)."""
    return EvalSettings.model_validate({key: params[f"evaluation.{key}"] for key in EvalSettings.model_fields
                                        if f"evaluation.{key}" in params})


# --------------------------------------------------------------------------- publishing and reading


def log_task_card(run_id: str, card: TaskCard, uri: str | None = None) -> None:
    """Log `card` as the run's `task_card.json` artifact (logging it again replaces it: safe to retry)."""
    call_with_retry(store.client(uri).log_text, run_id, card.model_dump_json(), CARD_FILE)


def publish_task_card(run_id: str, task: TaskSpec, settings: EvalSettings, uri: str | None = None,
                      worked: Examples = ()) -> bool:
    """Build the card of a job's task from its first evaluation rows (read where the job ran, from the data it
    evaluated on) and the worked examples its prompts showed (`JobResult.worked_examples`), and log it with the job's
    run; False, with a warning logged, when that fails: the job's results stand without it (its task is then missing
    from the page)."""
    from jobs.data import eval_rows

    try:
        rows = eval_rows(task, min(CARD_EXAMPLES, settings.limit or task.eval_limit))
        log_task_card(run_id, task_card(task, rows, settings, worked), uri)
    except Exception as error:
        log.warning("task card of run %s not published: %s: %s", run_id, type(error).__name__, str(error)[:300])
        return False
    return True


def read_task_card(run_id: str, uri: str | None = None) -> TaskCard | None:
    """The card a run published; None when it has none (or one this version cannot read)."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = call_with_retry(store.client(uri).download_artifacts, run_id, CARD_FILE, folder)
            text = Path(path).read_text()
        except (MlflowException, OSError):
            return None
    try:
        return TaskCard.model_validate_json(text)
    except ValidationError as error:
        log.warning("task card of run %s unreadable: %s", run_id, str(error).splitlines()[0][:300])
        return None


class TaskCards:
    """Cards by run id, each read once (`read_task_card`); a run without one is asked again after `miss_ttl_s`."""

    def __init__(self, uri: str, miss_ttl_s: float = 30.0,
                 read: Callable[[str, str], TaskCard | None] = read_task_card) -> None:
        self.uri, self.miss_ttl_s, self.read = uri, miss_ttl_s, read
        self.found: dict[str, TaskCard] = {}
        self.missed: dict[str, float] = {}  # run id -> when it had no card
        self.lock = threading.Lock()

    def __call__(self, run_id: str) -> TaskCard | None:
        """The run's card (blocking: call it from a thread in async code)."""
        with self.lock:
            if run_id in self.found:
                return self.found[run_id]
            if time.monotonic() - self.missed.get(run_id, -float("inf")) < self.miss_ttl_s:
                return None
        card = self.read(run_id, self.uri)
        with self.lock:
            if card is None:
                self.missed[run_id] = time.monotonic()
            else:
                self.found[run_id] = card
                self.missed.pop(run_id, None)
        return card
