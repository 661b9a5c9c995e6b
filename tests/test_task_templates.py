"""The study's 31 tasks: the catalogue matches the reference table, and every template renders real rows.

The reference table is the project's copy in tracking/reference/lora_land_tasks.csv. Each task has
three hand-written rows in tests/fixtures/tasks/<task>.jsonl with the real dataset's column names and
value types (ints for class labels, lists for tokens, dicts where the data is nested).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import jinja2
import jinja2.meta
import pytest

from core.catalog import load_catalog_file
from core.prompts import EXAMPLES, completion_for, cut_prompt, prompt_for
from core.schemas import TaskSpec

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
TASKS_FILE = ROOT / "configs" / "catalog" / "tasks.yaml"
REFERENCE_CSV = ROOT / "tracking" / "reference" / "lora_land_tasks.csv"
FIXTURES = ROOT / "tests" / "fixtures" / "tasks"
KAGGLE_TASKS = {"legal", "covid", "jigsaw"}
# Files `loraland data prepare` writes (jobs/prepare.py): the Kaggle tasks and customer_support (a GitHub release).
PREPARED_KIND = {**dict.fromkeys(KAGGLE_TASKS, "kaggle"), "customer_support": "github"}
# The download named differs from the table's on purpose (comment in tasks.yaml): its row counts are that one's.
SOURCE_DEVIATIONS = {"jigsaw": "jigsaw-toxic-comment-classification-challenge"}

# Entries that differ from the table on purpose (each has a comment in tasks.yaml): the table's value
# does not load from the hub as written.
CONFIG_DEVIATIONS = {
    "winogrande": "winogrande_debiased",
    "arc_combined": "ARC-Easy+ARC-Challenge",  # the study's evaluation rows come Easy first
}
EVAL_SPLIT_DEVIATIONS = {
    "winogrande": "validation",
    "glue_mnli": "validation_matched+validation_mismatched",
}


def _reference_rows() -> list[dict[str, str]]:
    with REFERENCE_CSV.open(newline="") as handle:
        return list(csv.DictReader(handle))


REFERENCE = _reference_rows()
REFERENCE_BY_NAME = {row["task"]: row for row in REFERENCE}
TASKS: list[TaskSpec] = load_catalog_file(TASKS_FILE)[1]
TASKS_BY_NAME = {task.name: task for task in TASKS}
TASK_NAMES = [row["task"] for row in REFERENCE]


def _fixture_rows(name: str) -> list[dict]:
    path = FIXTURES / f"{name}.jsonl"
    assert path.is_file(), f"missing fixture {path}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _template_names(source: str) -> set[str]:
    """Names a template reads from the row (globals such as `namespace` excluded)."""
    env = jinja2.Environment()
    return jinja2.meta.find_undeclared_variables(env.parse(source)) - set(env.globals)


# --------------------------------------------------------------------------- the catalogue


def test_reference_table_has_31_tasks():
    assert len(REFERENCE) == 31
    assert len(set(TASK_NAMES)) == 31


def test_catalogue_has_exactly_the_reference_tasks_in_order():
    assert [task.name for task in TASKS] == TASK_NAMES


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_matches_reference_row(name):
    task, ref = TASKS_BY_NAME[name], REFERENCE_BY_NAME[name]
    assert task.category == ref["category"]
    assert task.metric == ref["metric"]
    assert task.description.strip(), "every task needs a one-line description"
    assert "\n" not in task.description.strip()

    source = task.dataset
    if name in PREPARED_KIND:
        kind = PREPARED_KIND[name]
        assert source.kind == kind
        slug = SOURCE_DEVIATIONS.get(name, ref["hf_dataset"].replace("(kaggle)", "").strip())
        assert slug in source.id, f"source {source.id!r} does not name {slug!r}"
        assert source.data_files == {"train": f"{kind}/{name}/train.csv", "test": f"{kind}/{name}/test.csv"}
    else:
        assert source.kind == "hf"
        # the study's id, or the repository its legacy id now redirects to (owner added: tests/test_data.py)
        assert source.id.split("/")[-1] == ref["hf_dataset"].split("/")[-1]
        assert source.data_files is None
    assert source.config == CONFIG_DEVIATIONS.get(name, ref["hf_config"] or None)
    assert source.eval_split == EVAL_SPLIT_DEVIATIONS.get(name, ref["eval_split"])
    expected_size = int(ref["eval_split_size"]) if ref["eval_split_size"] else None
    assert source.eval_split_size == expected_size


@pytest.mark.parametrize("name", TASK_NAMES)
def test_answer_kind_fits_metric(name):
    task = TASKS_BY_NAME[name]
    if task.metric == "rouge":
        assert task.answer == "text"
    elif task.metric == "humaneval":
        assert task.answer == "code"
        assert task.eval is not None
    elif task.metric == "stsb_similarity":
        assert task.answer == "number"
    else:
        assert task.answer in {"exact", "boolean", "choice", "last_number"}
    if task.answer in {"exact", "boolean", "choice"}:
        assert task.labels, "classification tasks list their allowed answers"
    else:
        assert task.labels is None


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generation_budget_is_the_studys(name):
    """The study generated up to 256 new tokens for every task (1024 for mmlu)."""
    assert TASKS_BY_NAME[name].max_new_tokens == (1024 if name == "mmlu" else 256)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_templates_use_only_listed_columns(name):
    task = TASKS_BY_NAME[name]
    assert len(set(task.columns)) == len(task.columns)
    shown = {EXAMPLES} if task.worked_examples else set()  # a prompt's worked examples (first training rows)
    for source, allowed in ((task.prompt, shown), (task.completion, set())):
        unlisted = _template_names(source) - set(task.columns) - allowed
        assert not unlisted, f"template reads columns not in `columns`: {sorted(unlisted)}"
    if task.eval is not None:
        unlisted = _template_names(task.eval.prompt) - set(task.eval.columns) - shown
        assert not unlisted, f"eval template reads columns not in eval.columns: {sorted(unlisted)}"


# --------------------------------------------------------------------------- rendering real rows


@pytest.mark.parametrize("name", TASK_NAMES)
def test_fixture_rows_have_the_dataset_columns(name):
    task = TASKS_BY_NAME[name]
    rows = _fixture_rows(name)
    assert len(rows) == 3
    first_keys = set(rows[0])
    for row in rows:
        assert set(row) == first_keys, "every row of a dataset has the same columns"
        assert set(row) >= set(task.columns), f"row lacks {sorted(set(task.columns) - set(row))}"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_prompt_and_completion_render(name):
    task = TASKS_BY_NAME[name]
    rows = _fixture_rows(name)  # the first stands for the training split's first row: the worked example
    for row in rows:
        # Render from the listed columns only: a template reading any other column fails here.
        listed = {column: row[column] for column in task.columns}
        prompt = prompt_for(task, listed, examples=[{c: r[c] for c in task.columns} for r in rows])
        completion = completion_for(task, listed)
        assert prompt.strip(), "empty prompt"
        assert completion.strip(), "empty completion"
        assert prompt == prompt_for(task, row, examples=rows)

        lines = prompt.split("\n")
        assert len(lines) >= 3, "an instruction, the input, then the cue or closing request"
        last = lines[-1]  # how it must end (a cue or the study's closing request) is checked in test_study_fidelity
        assert last.strip(), "the prompt ends on a non-blank line"
        assert last == last.rstrip(), "the last line has no trailing whitespace (the target adds one space)"
        gold = completion.strip()
        named = [label for label in task.labels or [gold] if re.search(rf"(?<!\w){re.escape(label)}(?!\w)", last)]
        assert named != [gold], f"last line {last!r} gives away {gold!r}"  # listing all the labels gives nothing away

        target = prompt + " " + completion
        assert target.startswith(prompt + " ") and target.endswith(completion)

        if task.labels:
            assert gold in task.labels, f"completion {gold!r} is not one of the labels"
        if task.answer == "last_number":
            assert re.search(r"####\s*-?[\d,.]+\s*$", gold)
        if task.answer == "number":
            assert 0.0 <= float(gold) <= 5.0


def test_magicoder_eval_prompt_renders_humaneval_rows():
    task = TASKS_BY_NAME["magicoder"]
    assert task.eval is not None
    assert task.eval.dataset.id == "openai/openai_humaneval"
    assert task.eval.columns == ["task_id", "prompt", "canonical_solution", "test", "entry_point"]
    rows = _fixture_rows("magicoder_eval")
    assert len(rows) == 3
    for row in rows:
        assert set(row) >= set(task.eval.columns)
        prompt = prompt_for(task, {c: row[c] for c in task.eval.columns}, evaluation=True)
        # the study's wrapper: the training prompt's shape, HumanEval's prompt as the problem, python as the language
        assert f"### Problem: {row['prompt']}" in prompt and "### Language: python\n" in prompt
        assert prompt.endswith("### Solution:") and prompt.count("###") == task.prompt.count("###")
        assert "def check(candidate):" in row["test"]


def test_magicoder_eval_fixture_solutions_pass_their_tests():
    for row in _fixture_rows("magicoder_eval"):
        namespace: dict = {}
        exec(row["prompt"] + row["canonical_solution"] + row["test"], namespace)
        namespace["check"](namespace[row["entry_point"]])


def test_every_fixture_belongs_to_a_task():
    names = {path.stem for path in FIXTURES.glob("*.jsonl")}
    assert names == set(TASK_NAMES) | {"magicoder_eval"}


# --------------------------------------------------------------------------- cutting long prompts


def test_short_prompts_are_not_cut():
    for name in TASK_NAMES:
        task = TASKS_BY_NAME[name]
        rows = _fixture_rows(name)
        for row in rows:
            assert prompt_for(task, row, 1500, examples=rows) == prompt_for(task, row, examples=rows)
    assert cut_prompt("Instruction.\nInput: x\nAnswer:", 29) == "Instruction.\nInput: x\nAnswer:"


def test_long_prompts_keep_the_instruction_and_the_cue():
    task = TASKS_BY_NAME["legal"]
    row = {"clause_text": "The Supplier shall deliver the goods on time. " * 100, "clause_type": "delivery"}
    full = prompt_for(task, row)
    lines = full.split("\n")
    cut = prompt_for(task, row, 1500)
    assert len(full) > 1500 and len(cut) == 1500
    head = full[: full.index(row["clause_text"]) + 100]
    assert cut.startswith(head), "the instruction and the input's start are kept"
    assert cut.endswith("\n" + lines[-1]) and lines[-1] == "### Clause type:", "the cue the completion follows is kept"
    assert cut == full[: 1500 - len(lines[-1]) - 1] + "\n" + lines[-1], "only the end of the input is dropped"
    # The same cut wherever the prompt is built: training (as above) and evaluation, for every model
    # (it works on characters, before any tokenizer).
    assert prompt_for(task, row, 1500, evaluation=True) == cut
    target = cut + " " + completion_for(task, row)
    assert target.endswith("### Clause type: delivery"), "the completion follows the cue unchanged"


@pytest.mark.parametrize(
    ("text", "max_chars", "expected"),
    [
        ("0123456789\nQ:", 6, "012\nQ:"),  # head cut, cue kept
        ("0123456789\nQ:", 3, "\nQ:"),  # only the cue fits
        ("0123456789\nQ:", 2, "01"),  # the cue itself is too long: plain cut
        ("0123456789", 4, "0123"),  # no cue line: plain cut
        ("0123456789\nQ:", 13, "0123456789\nQ:"),  # exactly at the limit: untouched
    ],
)
def test_cut_prompt_edges(text, max_chars, expected):
    assert cut_prompt(text, max_chars) == expected
    assert len(cut_prompt(text, max_chars)) <= max_chars
