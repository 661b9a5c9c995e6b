"""Prompt templates: a task's Jinja templates turn a dataset row into prompt and completion.

Templates are completion-style, the same for base and fine-tuned models, and end on their final line: an
answer cue, or (where the study's prompt did) a closing request.

A task with `worked_examples: N` shows the first N rows of its training split as worked examples, as the study did:
the caller passes those rows in (`jobs.data.example_rows` reads them; a job's task card carries them to the page) and
the templates read them as `examples`, each row's columns plus its rendered `completion`. Without them such a prompt
is not rendered (a NotFound says so), never rendered without its examples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.meta

from core.errors import NotFound
from core.schemas import EvalSettings, PromptCut, TaskSpec

EXAMPLES = "examples"  # the templates' name for a task's worked examples
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


@lru_cache(maxsize=512)
def _template(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def render(source: str, row: Mapping[str, Any]) -> str:
    """Render one template against one row; a missing column raises a NotFound (a KeyError) naming it."""
    try:
        return _template(source).render(**row)
    except jinja2.UndefinedError as exc:
        raise NotFound(f"template needs a column the row lacks: {exc.message}") from None


def template_problems(source: str, columns: list[str]) -> list[str]:
    """What is wrong with a template for rows of `columns`: a Jinja syntax error, or a variable that is not a column."""
    try:
        used = jinja2.meta.find_undeclared_variables(_ENV.parse(source))
    except jinja2.TemplateSyntaxError as exc:
        return [f"not a valid Jinja template (line {exc.lineno}: {exc.message})"]
    unknown = sorted(used - set(columns))
    return [f"uses {', '.join(map(repr, unknown))}, not among its columns ({', '.join(columns)})"] if unknown else []


def template_reads(source: str, name: str) -> bool:
    """Whether a (valid) template reads the variable `name`."""
    return name in jinja2.meta.find_undeclared_variables(_ENV.parse(source))


CODE_METRIC = "humaneval"  # a code task: its prompt is a program's head, never cut (the model must see it whole)


Examples = Sequence[Mapping[str, Any]]  # a task's first training rows, for its worked examples


def evaluation_prompt(task: TaskSpec, row: Mapping[str, Any], settings: EvalSettings, examples: Examples = ()) -> str:
    """The prompt evaluation sends for `row`: the evaluation template, cut as `settings` say (a code prompt never)."""
    max_chars = None if task.metric == CODE_METRIC else settings.prompt_max_chars
    return prompt_for(task, row, max_chars, evaluation=True, cut=settings.prompt_cut, examples=examples)


def prompt_for(task: TaskSpec, row: Mapping[str, Any], max_chars: int | None = None, evaluation: bool = False,
               cut: PromptCut = "keep_cue", examples: Examples = ()) -> str:
    """The prompt for `row`; at evaluation a task with its own eval set uses that set's template. `examples` are the
    task's first training rows (`worked_examples`; a task without them needs none).

    Long prompts are cut the same way for every model, as `cut` says: `keep_cue` (`cut_prompt`) shortens
    the input before the final line, keeping the instruction head and the answer cue intact; `study`
    (`study_cut`) keeps the first `max_chars` characters, as the study did.
    """
    source = task.eval.prompt if evaluation and task.eval else task.prompt
    text = render(source, {**row, EXAMPLES: worked_examples(task, examples)} if task.worked_examples else row)
    if not max_chars:
        return text
    return study_cut(text, max_chars) if cut == "study" else cut_prompt(text, max_chars)


def study_cut(text: str, max_chars: int) -> str:
    """The study's cut: the first `max_chars` characters (a long input loses what follows it, the answer cue
    included)."""
    return text[:max_chars]


def completion_for(task: TaskSpec, row: Mapping[str, Any]) -> str:
    """The gold completion (training target) for `row`."""
    return render(task.completion, row)


def worked_examples(task: TaskSpec, rows: Examples) -> list[dict[str, Any]]:
    """What the templates read as `examples`: the first `task.worked_examples` of `rows` (the task's first training
    rows, in the dataset's order), each with its rendered `completion`; a NotFound when fewer rows are given."""
    if len(rows) < task.worked_examples:
        raise NotFound(f"task {task.name}: its prompt shows its first {task.worked_examples} training row(s) as worked "
                       f"examples, and {len(rows)} were given; read them where its data is (jobs.data.example_rows) "
                       "or from the task card its job published")
    return [{**row, "completion": completion_for(task, row)} for row in rows[: task.worked_examples]]


def examples_digest(rows: Examples) -> str:
    """A short fingerprint of worked-example rows (what a run logs of the examples its prompts held)."""
    text = json.dumps([dict(row) for row in rows], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cut_prompt(text: str, max_chars: int) -> str:
    """Cut `text` to at most `max_chars`, dropping characters before its final line (the cue or closing request)."""
    if len(text) <= max_chars:
        return text
    head, sep, cue = text.rpartition("\n")
    if not sep or len(cue) >= max_chars:
        return text[:max_chars]
    return head[: max_chars - len(cue) - 1] + "\n" + cue
