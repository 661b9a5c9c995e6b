"""Prompt templates: a task's Jinja templates turn a dataset row into prompt and completion.

Templates are completion-style, the same for base and fine-tuned models, and end on their final line: an
answer cue, or (where the study's prompt did) a closing request.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.meta

from core.errors import NotFound
from core.schemas import EvalSettings, PromptCut, TaskSpec

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


CODE_METRIC = "humaneval"  # a code task: its prompt is a program's head, never cut (the model must see it whole)


def evaluation_prompt(task: TaskSpec, row: Mapping[str, Any], settings: EvalSettings) -> str:
    """The prompt evaluation sends for `row`: the evaluation template, cut as `settings` say (a code prompt never)."""
    max_chars = None if task.metric == CODE_METRIC else settings.prompt_max_chars
    return prompt_for(task, row, max_chars, evaluation=True, cut=settings.prompt_cut)


def prompt_for(task: TaskSpec, row: Mapping[str, Any], max_chars: int | None = None, evaluation: bool = False,
               cut: PromptCut = "keep_cue") -> str:
    """The prompt for `row`; at evaluation a task with its own eval set uses that set's template.

    Long prompts are cut the same way for every model, as `cut` says: `keep_cue` (`cut_prompt`) shortens
    the input before the final line, keeping the instruction head and the answer cue intact; `study`
    (`study_cut`) keeps the first `max_chars` characters, as the study did.
    """
    source = task.eval.prompt if evaluation and task.eval else task.prompt
    text = render(source, row)
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


def cut_prompt(text: str, max_chars: int) -> str:
    """Cut `text` to at most `max_chars`, dropping characters before its final line (the cue or closing request)."""
    if len(text) <= max_chars:
        return text
    head, sep, cue = text.rpartition("\n")
    if not sep or len(cue) >= max_chars:
        return text[:max_chars]
    return head[: max_chars - len(cue) - 1] + "\n" + cue
