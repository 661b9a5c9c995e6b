"""The study's setup: its scoring rules (jobs.study_metrics) on the edge cases listed in
shared/reference/lora_land_task_formats.yaml, its prompt structure, answer formats, generation limits and prompt cut
in the catalogue, and the per-sweep choice between study and strict scoring."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import jinja2
import jinja2.meta
import numpy as np
import pandas as pd
import pytest
import yaml

from core.catalog import load_catalog, template_problems_of
from core.errors import ConfigError, NotFound
from core.parsing import parse_model
from core.prompts import EXAMPLES, completion_for, evaluation_prompt, examples_digest, prompt_for
from core.schemas import DatasetSource, EvalSettings, StudyMetric, TaskSpec
from jobs import prepare
from jobs import study_metrics as sm
from jobs.data import eval_rows, example_rows, load_rows
from jobs.evaluate import EvalRequest, evaluation_request, prepare_evaluation, score_all
from orchestrator import cli
from tracking import heuristics as heur
from tracking import report
from tracking import study_analysis as study

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- exact step


@pytest.mark.parametrize(
    "output, target, expected",
    [
        ("1", "1", True),
        ("Positive.", "positive", True),  # periods and case
        (" 1", "1", False),  # a leading space defeats the string comparison; the float text is "1.0"
        ("1\n", "1", False),
        ("1", 1, True),
        ("1.0", "1.0", True),
        (" 1\n", "1.0", True),  # the float branch: the whole output parses, its text equals the target
        ("3.80", "3.8", True),
        ("three", "3", False),
    ],
)
def test_exact_step(output, target, expected):
    assert sm.exact_step(output, target) is expected


# --------------------------------------------------------------------------- binary_accuracy_flex


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1", True), ("0", False), ("10", True),  # 1 is tested before 0
        ("no, the answer is 1", True),  # a digit beats any word
        ("Yes", True), ("no", False),
        ("not sure", False), ("I know", False), ("none", False), ("cannot say", False),  # "no" inside a word
        ("yes and no", True),  # yes is tested before no
        ("True", True), ("false", False), ("Positive", True), ("negative", False),
        (True, True), (False, False),  # boolq's targets
        ("maybe", None), ("", None),
    ],
)
def test_flex_boolean(text, expected):
    assert sm.flex_boolean(text) is expected


@pytest.mark.parametrize(
    "output, target, expected",
    [
        ("1", "1", 1.0), ("positive", "1", 1.0), ("0", "0", 1.0), ("negative", "1", 0.0),
        ("yes", True, 1.0), ("Not at all", False, 1.0), ("10", "0", 0.0),
        ("maybe", "0", 0.0),  # an unmappable output scores 0
        ("maybe", "maybe", 0.0),  # even when it equals an unmappable target
    ],
)
def test_binary_accuracy_flex(output, target, expected):
    assert sm.binary_accuracy_flex(output, target) == expected


# --------------------------------------------------------------------------- digit-anywhere rules


@pytest.mark.parametrize(
    "output, target, expected",
    [
        ("2", "2", 1.0), ("The label is 2.", "2", 1.0), ("0 or 1", "1", 1.0), ("0 or 1", "0", 1.0),
        ("0 or 1", "2", 0.0), ("contradiction", "2", 0.0), ("Entailment", "entailment", 1.0),
    ],
)
def test_mnli_accuracy(output, target, expected):
    assert sm.mnli_accuracy(output, target) == expected


@pytest.mark.parametrize(
    "output, target, expected",
    [
        ("3", "3", 1.0), ("ending 3", "3", 1.0), ("0123", "2", 1.0), ("1", "3", 0.0), ("none", "0", 0.0),
    ],
)
def test_hellaswag_accuracy(output, target, expected):
    assert sm.hellaswag_accuracy(output, target) == expected


@pytest.mark.parametrize(
    "output, target, expected",
    [
        ("1", "1", 1.0), ("10", "1", 1.0), ("1 because they match", "1", 1.0),  # the fallback for 1
        ("0", "0", 1.0), ("0.", "0", 1.0),  # target 0: only the exact step
        ("0\n", "0", 0.0), (" 0", "0", 0.0), ("0, not equivalent", "0", 0.0),  # no fallback for 0
        ("10", "0", 0.0),
    ],
)
def test_mrpc_accuracy_one_sided_fallback(output, target, expected):
    assert sm.mrpc_accuracy(output, target) == expected


# --------------------------------------------------------------------------- label anywhere, first number


@pytest.mark.parametrize(
    "output, target, expected",
    [
        ("pay bill", "pay bill", 1.0), ("The caller wants to PAY BILL today.", "pay bill", 1.0),
        ("billing", "pay bill", 0.0), ("check balance, then transfer money", "transfer money", 1.0),
    ],
)
def test_customer_support_label_anywhere(output, target, expected):
    assert sm.customer_support_accuracy(output, target) == expected


@pytest.mark.parametrize(
    "output, target, expected",
    [
        ("2", "2", 1.0), ("The answer is 2, not 3", "2", 1.0), ("3 (not 2)", "2", 0.0),
        ("1,000 apples", "1,000", 1.0), ("I don't know", "none", 1.0),  # neither has a number
        ("2.0", "2", 0.0),  # strings compared, not values
    ],
)
def test_mmlu_accuracy_first_number(output, target, expected):
    assert sm.mmlu_accuracy(output, target) == expected


# --------------------------------------------------------------------------- stsb


@pytest.mark.parametrize(
    "output, target, expected",
    [
        ("3.0", "3.0", 1.0), ("4", "3", 0.8),
        ("7", "5", 0.6),  # a bare number has no range check
        ("20", "0", -3.0),  # so a large value scores below 0
        ("about 7", "5", 0.0),  # a number found inside text is range-checked: above 5 is discarded
        ("about 4", "5", 0.8), ("similar", "2.5", 0.0), ("3", "n/a", 0.0), ("nan", "2", 0.0),
    ],
)
def test_stsb_without_range_check(output, target, expected):
    assert sm.stsb(output, target) == pytest.approx(expected)


# --------------------------------------------------------------------------- gsm8k


@pytest.mark.parametrize(
    "output, target, expected",
    [
        ("She pays 3 * 4 = 12 dollars.\n#### 12", "3*4=<<3*4=12>>12\n#### 12", 1.0),
        ("The answer is $1,200.", "#### 1200", 1.0),
        ("12 is the answer, checked in 2 steps", "#### 12", 0.0),  # the last number wins
        ("It is 12...", "#### 12", 1.0),  # one run: its trailing periods are stripped
        ("It is 12, I think...", "#### 12", 0.0),  # a lone ellipsis is the last run and does not parse
        ("-5", "#### -5", 1.0), ("no number", "#### 3", 0.0),
    ],
)
def test_gsm8k_last_numbers(output, target, expected):
    assert sm.gsm8k_regex(output, target) == expected


# --------------------------------------------------------------------------- dbpedia and rouge


@pytest.mark.parametrize(
    "output, target, expected",
    [
        ("Animal", "Animal", 1.0), ("animal.", "Animal", 1.0), ("9", "Animal", 1.0),  # index 9 is Animal (0-based)
        (" 9\n", "Animal", 1.0), ("It is an Animal", "Animal", 0.4), ("Plant", "Animal", 0.0),
        ("14", "Animal", 0.0),  # out of range: scored as the text "14"
    ],
)
def test_dbpedia_is_rouge_l(output, target, expected):
    assert sm.dbpedia(output, target) == pytest.approx(expected)


def test_rouge_counts_dict_skeleton_words():
    target = "{'B-Chemical': ['aspirin'], 'B-Disease': [], 'I-Disease': [], 'I-Chemical': []}"
    empty = "{'B-Chemical': [], 'B-Disease': [], 'I-Disease': [], 'I-Chemical': []}"
    assert sm.rouge(empty, target) == pytest.approx(16 / 17)


# --------------------------------------------------------------------------- failed generations


def test_failed_generations_are_left_out_and_counted():
    scores = [sm.study_score("mnli_accuracy", out, "1") for out in ["1", None, "0", None]]
    assert scores == [1.0, None, 0.0, None]
    assert sm.mean_of_answered(scores) == sm.StudyTally(mean=0.5, answered=2, failed=2)
    assert sm.mean_of_answered([None]) == sm.StudyTally(0.0, 0, 1)


def test_unknown_study_metric():
    with pytest.raises(ValueError, match="unknown study metric"):
        sm.study_score("arc_accuracy", "A", "A")


def test_the_schemas_study_metric_names_are_the_implemented_rules():
    assert set(get_args(StudyMetric)) == set(sm.STUDY_METRICS)


# --------------------------------------------------------------------------- catalogue


MISSING_IN_STUDY = {"arc_combined", "covid", "winogrande", "magicoder"}


def test_every_study_task_names_its_study_metric():
    catalog = load_catalog()
    for name in catalog.study_tasks:
        task = catalog.task(name)
        if name in MISSING_IN_STUDY:
            assert task.study_metric is None, name
        else:
            assert task.study_metric in sm.STUDY_METRICS, name
    for name in set(catalog.tasks) - catalog.study_tasks:
        assert catalog.task(name).study_metric is None, f"demo task {name} keeps strict scoring"


# --------------------------------------------------------------------------- the study's setup in the catalogue

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "tasks"
# The reference file lives beside the project (it is not shipped): the table below copies its facts, and
# test_setup_table_agrees_with_the_reference_file checks the copy wherever the file is present.
REFERENCE_FORMATS = ROOT.parent / "shared" / "reference" / "lora_land_task_formats.yaml"
FREE_TEXT = r"(?s).*\S.*"
DIGIT_01 = r"[01]"


@dataclass(frozen=True)
class StudyPrompt:
    """What the study's prompt for one task holds (shared/reference/lora_land_task_formats.yaml), in our columns."""

    reads: tuple[str, ...]  # the columns the prompt reads (the study's input columns), in the order it shows them
    gold: str  # the gold answer's format, a regex over our rendered gold (target.format, target.labels)
    examples: int = 0  # worked examples in the prompt (examples_in_prompt)
    ends_on_cue: bool = True  # False where the study's prompt ends on its closing request (prompt_ending)


STUDY_SETUP: dict[str, StudyPrompt] = {
    "bc5cdr": StudyPrompt(("tokens",), r"\{'B-Chemical': \[.*\], 'B-Disease': \[.*\], "
                          r"'I-Disease': \[.*\], 'I-Chemical': \[.*\]\}", 1),
    "conllpp": StudyPrompt(("tokens",), r'\{"person": \[.*\], "organization": \[.*\], '
                           r'"location": \[.*\], "miscellaneous": \[.*\]\}', 1),
    "e2e_nlg": StudyPrompt(("meaning_representation",), FREE_TEXT, 1),
    "tldr_content_gen": StudyPrompt(("headline",), FREE_TEXT),
    "tldr_headline_gen": StudyPrompt(("content",), FREE_TEXT),
    "viggo": StudyPrompt(("meaning_representation",), FREE_TEXT, 2),
    "webnlg": StudyPrompt(("modified_triple_sets",), FREE_TEXT, 1),
    "magicoder": StudyPrompt(("problem", "lang"), FREE_TEXT),
    "wikisql": StudyPrompt(("table", "question"), r"SELECT .*"),
    "boolq": StudyPrompt(("passage", "question"), r"true|false"),
    "dbpedia": StudyPrompt(("title", "content"), "|".join(sm.DBPEDIA_CLASSES)),
    "customer_support": StudyPrompt(("text",), r"replace card|transfer money|check balance|order checks|pay bill"
                                    r"|reset password|schedule appointment|get branch hours|none of the above"),
    "glue_qnli": StudyPrompt(("question", "sentence"), DIGIT_01),
    "glue_stsb": StudyPrompt(("sentence1", "sentence2"), r"[0-4](\.\d+)?|5(\.0+)?"),
    "legal": StudyPrompt(("clause_text",), r"[\w-]+"),
    "reuters": StudyPrompt(("title", "text"), FREE_TEXT),
    "mmlu": StudyPrompt(("question", "choices"), r"[1-4]"),
    "winogrande": StudyPrompt(("sentence", "option1", "option2"), r"[12]"),
    "arc_combined": StudyPrompt(("question", "choices"), r"[A-E1-5]", ends_on_cue=False),
    "glue_cola": StudyPrompt(("sentence",), DIGIT_01),
    "glue_mnli": StudyPrompt(("premise", "hypothesis"), r"[012]"),
    "glue_mrpc": StudyPrompt(("sentence1", "sentence2"), DIGIT_01),
    "glue_qqp": StudyPrompt(("question1", "question2"), DIGIT_01),
    "glue_sst2": StudyPrompt(("sentence",), DIGIT_01, ends_on_cue=False),
    "glue_wnli": StudyPrompt(("sentence1", "sentence2"), DIGIT_01),
    "covid": StudyPrompt(("OriginalTweet", "TweetAt", "Location"),
                         r"Extremely Positive|Positive|Neutral|Negative|Extremely Negative"),
    "hellaswag": StudyPrompt(("ctx", "endings"), r"[0-3]"),
    "hellaswag_processed": StudyPrompt(("ctx",), FREE_TEXT, 1),
    "jigsaw": StudyPrompt(("comment_text",), r"yes|no"),
    "drop": StudyPrompt(("passage", "question"), FREE_TEXT),
    "gsm8k": StudyPrompt(("question",), r"(?s).*####\s*-?[\d,.]+"),
}
# The study's mmlu and arc prompts are one precomputed column built from the question and its choices.
PRECOMPUTED_PROMPT = {"mmlu", "arc_combined"}
CHAT_MARKERS = re.compile(r"\[INST\]|<\|im_start\|>|<start_of_turn>|<\|user\|>|<\|assistant\|>|<s>|</s>|\bsystem:",
                          re.I)
EXAMPLE_HEADER = re.compile(r"(?m)^Example( \d+)?:$")
SCORED_BY_RULE = {"binary_accuracy_flex", "mnli_accuracy", "mrpc_accuracy", "hellaswag_accuracy",
                  "customer_support_accuracy", "mmlu_accuracy", "stsb", "gsm8k_regex", "dbpedia"}


def _rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def _template_columns(source: str) -> set[str]:
    """The row columns a template reads."""
    env = jinja2.Environment()
    return jinja2.meta.find_undeclared_variables(env.parse(source)) - set(env.globals)


def _shown(value: Any) -> list[str]:
    """The texts a column's value puts in a prompt, in order (nested or missing values: none checked)."""
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [item.strip() for item in value]
    return []


def test_setup_table_covers_the_31_tasks():
    assert set(STUDY_SETUP) == set(load_catalog().study_tasks)


@pytest.mark.parametrize("name", sorted(STUDY_SETUP))
def test_prompt_has_the_studys_structure_and_gold_its_format(name):
    task, expected = load_catalog().task(name), STUDY_SETUP[name]
    assert _template_columns(task.prompt) - {EXAMPLES} == set(expected.reads), "the prompt reads the study's inputs"
    assert task.worked_examples == expected.examples, "the study's number of worked examples"
    for source in (task.prompt, task.eval.prompt if task.eval else ""):
        assert not CHAT_MARKERS.search(source), "no chat markers in the template"
    assert all(re.fullmatch(expected.gold, label) for label in task.labels or []), "labels are the study's values"
    rows = _rows(name)  # the first rows stand for the training split's first rows: the worked examples
    for row in rows:
        prompt = prompt_for(task, {column: row[column] for column in task.columns}, examples=rows)
        assert len(EXAMPLE_HEADER.findall(prompt)) == expected.examples, "the study's number of worked examples"
        position = 0
        for column in expected.reads:  # the input fields in the study's order
            for text in _shown(row[column]):
                found = prompt.find(text, position)
                assert found >= 0, f"{column} ({text[:40]!r}) is missing or out of the study's order"
                position = found + len(text)
        last = prompt.rsplit("\n", 1)[-1]
        if expected.ends_on_cue:
            assert last.endswith(":"), f"the study's prompt ends on an answer cue, not on {last!r}"
        else:
            assert last.endswith(".") and position <= len(prompt) - len(last), "it ends on its closing request"
        gold = completion_for(task, row)
        assert re.fullmatch(expected.gold, gold), f"gold {gold!r} is not in the study's format"
        if task.study_metric in SCORED_BY_RULE:
            assert sm.study_score(task.study_metric, gold, gold) == 1.0, "the gold scores 1 against itself"


# --------------------------------------------------------------------------- worked examples: the first training rows

WORKED = sorted(name for name, expected in STUDY_SETUP.items() if expected.examples)


def _on_fixture(name: str) -> TaskSpec:
    """The catalogue's task reading its fixture as both its training and its evaluation split (the fixture's rows in
    the dataset's order: its first rows are the task's first training rows)."""
    path = str(FIXTURES / f"{name}.jsonl")
    source = DatasetSource(kind="local", id=f"fixture {name}", train_split="train", eval_split="test",
                           data_files={"train": path, "test": path})
    return load_catalog().task(name).model_copy(update={"dataset": source})


def _shows_first_rows(task: TaskSpec, prompt: str, rows: list[dict[str, Any]]) -> None:
    """`prompt` shows the first `task.worked_examples` of `rows` as its worked examples, in order, and no later row's
    gold as an example."""
    golds = [completion_for(task, row) for row in rows]
    n = task.worked_examples
    instruction_end = prompt.rindex("\n\n")  # the new input follows the examples' block
    positions = [prompt.find(gold) for gold in golds[:n]]
    assert all(0 <= at < instruction_end for at in positions) and positions == sorted(positions), "first rows shown"
    assert all(gold not in prompt[:instruction_end] for gold in golds[n:] if gold not in golds[:n]), "no later row"
    assert len(EXAMPLE_HEADER.findall(prompt)) == n


@pytest.mark.parametrize("name", WORKED)
def test_worked_examples_are_the_first_training_rows_on_every_path(name: str, tmp_path: Path):
    """Training, evaluation (the evaluator's path goes through `prepare_evaluation`), search validation
    (`evaluation_request`), heuristics, the job's logged params and the page's card all show the task's first training
    rows, whatever the job's `max_train_examples` cut."""
    from jobs.models import load_tokenizer
    from jobs.result import job_params
    from jobs.train import training_set
    from serving.webapp import render_prompt
    from tests.helpers import tiny_job
    from tracking.cards import TaskCard, task_card

    task, rows = _on_fixture(name), _rows(name)
    first = [{column: row[column] for column in task.columns} for row in rows[: task.worked_examples]]
    assert example_rows(task) == first
    settings = EvalSettings(limit=3)
    request = prepare_evaluation(task, settings)
    assert request.examples == first and len(request.prompts) == 3
    for prompt in request.prompts + evaluation_request(task, settings, rows[-1:]).prompts:
        _shows_first_rows(task, prompt, rows)
    job = tiny_job(tmp_path, max_train_examples=1).model_copy(update={"task": task, "evaluation": settings})
    trained = training_set(job, load_tokenizer(job.base_model))
    assert len(trained.examples) == 1
    _shows_first_rows(task, trained.sample[0]["prompt"], rows)
    for prompt in heur.task_examples(task, 3)[0]:
        _shows_first_rows(task, prompt, rows)
    params = job_params(job, request.examples)
    logged = (params["task.worked_examples"], params["task.worked_examples_digest"])
    assert logged == (len(first), examples_digest(first))
    published = task_card(task, eval_rows(task, 3), settings, example_rows(task))
    card = TaskCard.model_validate_json(published.model_dump_json())  # as the page reads it from the run
    assert [render_prompt(card, row) for row in eval_rows(task, 3)] == request.prompts, "the page renders the job's"
    with pytest.raises(NotFound, match="worked examples"):
        task_card(task, eval_rows(task, 3), settings)


def test_a_prompt_with_worked_examples_is_never_rendered_without_them():
    viggo = load_catalog().task("viggo")
    row = _rows("viggo")[2]
    with pytest.raises(NotFound, match=r"task viggo: its prompt shows its first 2 training row\(s\) as worked "
                       r"examples, and 1 were given"):
        evaluation_prompt(viggo, row, EvalSettings(), _rows("viggo")[:1])
    assert prompt_for(viggo, row, examples=_rows("viggo")) == prompt_for(viggo, row, examples=_rows("viggo")[:2])
    glue = load_catalog().task("glue_sst2")
    assert glue.worked_examples == 0 and prompt_for(glue, _rows("glue_sst2")[0]), "a task without them needs none"


def test_only_the_fixtures_tasks_carry_worked_examples():
    """The study's examples come from the data; the demo tasks (generated offline) show none."""
    catalog = load_catalog()
    assert {name for name, task in catalog.tasks.items() if task.worked_examples} == set(WORKED)
    for name in WORKED:
        assert "Example" in catalog.task(name).prompt and "example." in catalog.task(name).prompt


def test_catalogue_rejects_worked_examples_a_prompt_does_not_show():
    viggo = load_catalog().task("viggo")
    hidden = viggo.model_copy(update={"prompt": "Turn {{ meaning_representation }} into a sentence.\nOutput:"})
    assert template_problems_of(hidden) == ["prompt: never shows its 2 worked `examples`; show them, or set "
                                            "worked_examples: 0"]
    undeclared = viggo.model_copy(update={"worked_examples": 0})
    assert template_problems_of(undeclared) == ["prompt: uses 'examples', not among its columns (gem_id, "
                                                "meaning_representation, target, references)"]
    assert template_problems_of(viggo) == []


def test_drop_gold_is_the_first_span_only():
    task = load_catalog().task("drop")
    rows = [row for row in _rows("drop") if len(row["answers_spans"]["spans"]) > 1]
    assert rows, "a fixture row with several answer spans"
    assert [completion_for(task, row) for row in rows] == [row["answers_spans"]["spans"][0] for row in rows]


def test_magicoder_evaluation_wraps_humaneval_like_the_study():
    """The study fed HumanEval's prompt through its code model's template: problem, language python, solution cue."""
    task = load_catalog().task("magicoder")
    assert task.eval is not None and _template_columns(task.eval.prompt) == {"prompt"}
    row = _rows("magicoder_eval")[0]
    train = prompt_for(task, {"problem": "PROBLEM", "lang": "python"})
    assert prompt_for(task, row, evaluation=True) == train.replace("PROBLEM", row["prompt"])


def test_setup_table_agrees_with_the_reference_file():
    if not REFERENCE_FORMATS.is_file():
        pytest.skip(f"{REFERENCE_FORMATS} is not here (it sits beside the project, not in it)")
    reference = yaml.safe_load(REFERENCE_FORMATS.read_text())["tasks"]
    assert set(reference) == set(STUDY_SETUP)
    catalog = load_catalog()
    for name, expected in STUDY_SETUP.items():
        facts, task = reference[name], catalog.task(name)
        assert expected.examples == facts["examples_in_prompt"], name
        inputs = facts["input_columns"]
        if name not in PRECOMPUTED_PROMPT:
            assert len(expected.reads) == len(inputs), name
        assert [c for c in inputs if c in task.columns] == [c for c in expected.reads if c in inputs], name
        labels = facts["target"]["labels"]
        if task.labels and isinstance(labels, list):
            for label in labels:
                text = str(label).lower() if isinstance(label, bool) else str(label)
                assert re.fullmatch(expected.gold, text), f"{name}: the study's label {text!r}"
        ending = facts["prompt_ending"]
        ends_on_request = "no answer cue" in ending or "the instruction sentence" in ending
        assert expected.ends_on_cue is not ends_on_request, name


def test_generation_limits_are_the_studys():
    catalog = load_catalog()
    assert {name: catalog.task(name).max_new_tokens for name in catalog.study_tasks} == {
        name: 1024 if name == "mmlu" else 256 for name in catalog.study_tasks}


# --------------------------------------------------------------------------- prompt cut and evaluation settings


def test_the_studys_cut_keeps_the_first_characters_and_ours_keeps_the_cue():
    task = load_catalog().task("glue_sst2")
    row = {"sentence": "word " * 400, "label": 1, "idx": 0}
    full = prompt_for(task, row)
    request = full.rsplit("\n", 1)[1]  # the study's sst2 prompt ends on its request for 1 or 0
    study = prompt_for(task, row, 1500, cut="study")
    ours = prompt_for(task, row, 1500, cut="keep_cue")
    assert study == full[:1500] and request not in study
    assert len(ours) <= 1500 and ours.endswith("\n" + request) and ours.startswith("Here is a sentence")
    assert prompt_for(task, row, 1500) == ours, "a cut without a named kind keeps the cue"


def test_training_prompts_follow_the_configured_setup(tmp_path: Path):
    """`study`: training prompts are not cut by characters (the study's training capped tokens only); `keep_cue`: the
    same cut as evaluation. Demo prompts are short, so neither changes them."""
    from jobs.train import training_prompt
    from tests.helpers import tiny_job

    job = tiny_job(tmp_path).model_copy(update={"task": load_catalog().task("glue_sst2")})
    row = {"sentence": "word " * 400, "label": 1, "idx": 0}
    assert job.evaluation.prompt_cut == "study" and training_prompt(job, row) == prompt_for(job.task, row)
    keep_cue = job.model_copy(update={"evaluation": job.evaluation.model_copy(update={"prompt_cut": "keep_cue"})})
    assert training_prompt(keep_cue, row) == prompt_for(job.task, row, 1500, evaluation=True, cut="keep_cue")
    demo = tiny_job(tmp_path)
    rows = load_rows(demo.task.dataset, demo.task.dataset.train_split)
    assert all(training_prompt(demo, r) == prompt_for(demo.task, r, 1500) == prompt_for(demo.task, r) for r in rows)


def test_eval_settings_default_to_the_study():
    settings = EvalSettings()
    assert (settings.scoring, settings.prompt_cut, settings.prompt_max_chars) == ("study", "study", 1500)
    with pytest.raises(ConfigError):
        parse_model(EvalSettings, {"scoring": "loose"}, "sweep.yaml")


def test_score_all_study_and_strict():
    catalog = load_catalog()
    mrpc = catalog.task("glue_mrpc")
    predictions = ["1 (equivalent)", None, "0\n", "0"]
    golds = ["1", "1", "0", "0"]
    study = score_all(mrpc, predictions, golds, mrpc.study_metric)
    assert study == [1.0, None, 0.0, 1.0]
    assert sm.mean_of_answered(study) == sm.StudyTally(2 / 3, 3, 1)
    assert score_all(mrpc, predictions, golds, None) == [1.0, 0.0, 1.0, 1.0]  # strict: first word; a failure scores 0
    demo = catalog.task("demo_sentiment")
    assert demo.study_metric is None  # demo tasks keep strict scoring whatever `scoring` says


def test_study_scoring_takes_the_generated_text_as_is():
    """The study's harness scored each returned text without stripping it (reference `output_handling`); we used to
    lstrip under study scoring, which turned an mrpc " 0" (a miss there: 0 has no fallback) into a hit."""
    mrpc = load_catalog().task("glue_mrpc")

    def request(scoring: str) -> EvalRequest:
        settings = EvalSettings.model_validate({"scoring": scoring})
        return EvalRequest(mrpc, settings, [], [], 1, mrpc.study_metric if scoring == "study" else None)

    assert (request("study").strip, request("strict").strip) == ("none", "both")
    assert score_all(mrpc, [" 0", "0"], ["0", "0"], mrpc.study_metric) == [0.0, 1.0]


# ------------------------------------------------------------------------------ the study's headline analyses (report)


def _study_table_as_runs(scoring: str = "study", max_steps: int = study.STUDY_STEPS,
                         failed: dict[str, float] | None = None) -> pd.DataFrame:
    """The study's 10 x 31 table as finished runs (`report.runs_frame`'s columns, so a key it drops is lost here too):
    its scores as ours, logged with the study's settings (but `scoring` and `max_steps`) and each task's catalogue
    study rule and split, with `failed` generations per task (default 0)."""
    catalog = load_catalog()
    rows: list[dict[str, Any]] = []
    for row in pd.read_csv(report.STUDY_SCORES).itertuples():
        task = catalog.task(row.task)
        logged = {**study.STUDY_TRAINING, **study.STUDY_EVALUATION, "training.max_steps": max_steps,
                  "evaluation.scoring": scoring, "task.study_metric": task.study_metric, "evaluation.limit": None,
                  "task.eval_split": (task.eval or task).dataset.eval_split,
                  study.WORKED_EXAMPLES: task.worked_examples}
        for kind, value in (("train", row.finetuned_score), ("evaluate_base", row.base_score)):
            rows.append({"run_id": f"{kind}/{row.base_model}/{row.task}",
                         "job_key": f"k/{row.base_model}/{row.task}/{kind}",
                         "kind": kind, "base_model": row.base_model, "task": row.task, "category": row.category,
                         "metric": "accuracy", "score": value, "peak_memory_mb": 1.0, "train_wall_time_s": 1.0,
                         "job_wall_time_s": 1.0, "start_time": len(rows), **logged,
                         "failed_generations": (failed or {}).get(row.task, 0.0)})
    return pd.DataFrame(rows, columns=report.RUN_COLUMNS)


def test_headline_of_a_synthetic_10_by_31_sweep_is_the_studys():
    runs = _study_table_as_runs()
    reference = pd.read_csv(report.STUDY_SCORES)
    heads = study.headline(report.leaderboard(runs), reference).set_index("source")
    ours = heads.loc["this sweep"]
    assert (ours["tasks"], ours["pairs"]) == (31, 310)
    expected = {"mean_base_score": 0.301, "mean_finetuned_score": 0.685, "gpt4_mean": 0.661, "gpt35_mean": 0.599,
                "mean_best_finetuned_score": 0.756, "best_base_model_mean": 0.742}
    for column, value in expected.items():
        assert ours[column] == pytest.approx(value, abs=0.0015), column
    # GPT-4 wins magicoder, wikisql, boolq, mmlu, arc_combined and glue_wnli; customer_support is a tie (1.0 each)
    assert (ours["tasks_best_beats_gpt4"], ours["tasks_gpt4_beats_best"]) == (24, 6)
    assert ours["mean_margin_over_gpt4"] == pytest.approx(0.756 - 0.661, abs=0.003)
    assert ours["mean_margin_where_beaten"] > ours["mean_margin_over_gpt4"]
    assert ours["best_base_model"] == "zephyr-7b-beta"
    assert heads.loc["the study (same tasks)", "mean_finetuned_score"] == pytest.approx(ours["mean_finetuned_score"])


def test_fig8_matrix_is_symmetric_with_scores_and_heuristics():
    runs = _study_table_as_runs()
    board = report.leaderboard(runs)
    scores = study.task_scores(board, report.task_means(board), pd.read_csv(report.STUDY_SCORES))
    features = pd.DataFrame({"output_tokens_std": 10 - 8 * scores["base_score"], "train_examples": 1000.0},
                            index=scores.index).rename_axis("task")
    matrix = study.fig8_matrix(features, scores)
    names = ["output_tokens_std", "train_examples", "base_score", "finetuned_score", "lift", "best_finetuned_score",
             "gpt4_score", "max_lift_over_gpt4"]
    assert list(matrix.index) == names and list(matrix.columns) == names
    assert matrix.loc["output_tokens_std", "base_score"] == pytest.approx(-1.0)
    assert math.isnan(matrix.loc["train_examples", "lift"])  # a constant has no correlation
    assert matrix.loc["gpt4_score", "max_lift_over_gpt4"] < 0  # the study: r = -0.79
    assert matrix.equals(matrix.T)


def test_study_vs_ours_names_every_setting_that_differs_as_the_runs_logged_it():
    runs = _study_table_as_runs(scoring="strict", max_steps=200, failed={"boolq": 3.0})
    reference = pd.read_csv(report.STUDY_SCORES)
    splits = study.study_splits(pd.read_csv(report.STUDY_TASKS))
    pair = (runs["task"] == "boolq") & (runs["base_model"] == "mistral-7b")
    tuned, base = pair & (runs["kind"] == "train"), pair & (runs["kind"] == "evaluate_base")
    runs.loc[tuned, "lora.r"] = 16
    runs.loc[tuned, "lora.target_modules"] = pd.Series([["q_proj", "k_proj", "v_proj"]], index=runs.index[tuned])
    runs.loc[base, "evaluation.prompt_cut"] = "keep_cue"
    runs.loc[base, "task.eval_split"] = "train"
    runs.loc[base, study.WORKED_EXAMPLES] = 1  # a prompt that showed a worked example the study's did not
    board = report.leaderboard(runs)
    board.loc[board["task"] == "boolq", "finetuned_score"] -= 0.1
    table = study.study_vs_ours(report.study_comparison(board, reference), runs, splits)
    assert len(table) == 310
    row = table[(table["task"] == "boolq") & (table["base_model"] == "mistral-7b")].iloc[0]
    assert row["difference"] == pytest.approx(-0.1)
    assert row["base_difference"] == pytest.approx(0.0) and row["base_score"] == row["study_base_score"]
    assert row["differs"] == ("scoring strict; lora.r 16 (study 8); lora.target_modules ['q_proj', 'k_proj', 'v_proj'] "
                              "(study ['q_proj', 'v_proj']); training.max_steps 200 (study 2500)")
    assert row["base_differs"] == ("scoring strict; evaluation.prompt_cut keep_cue (study study); "
                                   "eval split train (study's table: validation); worked examples 1 (study 0)")
    assert row["failed_generations"] == 3  # generations the study's scoring left out of the mean, per run
    arc = table[table["task"] == "arc_combined"].iloc[0]
    assert arc["differs"].startswith("scoring strict (the study's code has no rule)")
    same = study.study_vs_ours(report.study_comparison(report.leaderboard(_study_table_as_runs()), reference),
                               _study_table_as_runs(), splits)
    assert set(same.loc[same["task"].isin(["boolq", "viggo"]), "differs"]) == {""}  # viggo: its 2 first rows
    assert set(same.loc[same["task"] == "boolq", "scoring"]) == {"study"}


def test_study_vs_ours_reads_the_scoring_a_run_logged_not_todays_catalogue():
    runs = _study_table_as_runs()
    boolq = runs["task"] == "boolq"
    runs.loc[boolq, "task.study_metric"] = None  # the run's task had no study rule when it ran
    runs[study.WORKED_EXAMPLES] = runs[study.WORKED_EXAMPLES].astype(object)  # as runs_frame mixes counts and UNKNOWN
    runs.loc[boolq, study.WORKED_EXAMPLES] = study.UNKNOWN  # nor logged its worked examples (an older run)
    runs = runs.drop(columns=["lora.alpha"])  # and no run logged alpha (an older run)
    reference = pd.read_csv(report.STUDY_SCORES)
    table = study.study_vs_ours(report.study_comparison(report.leaderboard(runs), reference), runs,
                                study.study_splits(pd.read_csv(report.STUDY_TASKS)))
    row = table[table["task"] == "boolq"].iloc[0]
    assert row["scoring"] == "strict"
    assert row["differs"] == ("scoring strict (the study's code has no rule); lora.alpha unknown; "
                              "worked examples unknown")
    assert "lora.alpha" not in row["base_differs"]  # training settings are a fine-tune's only


def test_report_writes_the_study_sections(tmp_path: Path):
    runs = _study_table_as_runs(failed={"boolq": 3.0})
    tasks = sorted(runs["task"].unique())
    rng = np.random.default_rng(0)
    features = pd.DataFrame({name: rng.normal(size=len(tasks)) for name in heur.HEURISTICS},
                            index=tasks).rename_axis("task")
    report.write_report(runs, tmp_path, features=features, length_unit="words")
    markdown = (tmp_path / "leaderboard.md").read_text()
    for title in ("Headline numbers against the study", "Study vs ours", "Correlation matrix (the study's Fig 8)"):
        assert f"## {title}" in markdown
    vs_ours = pd.read_csv(tmp_path / "study_vs_ours.csv")
    assert len(vs_ours) == 310
    assert (vs_ours.loc[vs_ours["task"] == "boolq", "failed_generations"] == 3).all()  # runs_frame's column reaches it
    assert (vs_ours.loc[vs_ours["task"] != "boolq", "failed_generations"] == 0).all()
    assert len(pd.read_csv(tmp_path / "study_headline.csv")) == 2
    fig8 = pd.read_csv(tmp_path / "fig8_correlations.csv", index_col=0)
    assert fig8.shape == (len(heur.HEURISTICS) + 6, len(heur.HEURISTICS) + 6)  # + best_finetuned_score


# --------------------------------------------------------------------------- data the study used that is not on the Hub


def _legal_download(folder: Path, per_type: int = 10) -> Path:
    """A small legal clause download in the original's shape: one CSV per clause type."""
    folder.mkdir(parents=True)
    for kind in ("governing-laws", "confidentiality"):
        pd.DataFrame({"clause_text": [f"{kind} clause {i}, with a comma" for i in range(per_type)],
                      "clause_type": kind}).to_csv(folder / f"{kind}.csv", index=False)
    return folder


def _covid_download(folder: Path) -> Path:
    """A small COVID-19 tweets download in the original's shape: two Latin-1 CSVs."""
    folder.mkdir(parents=True)
    for name, rows in (("Corona_NLP_train.csv", 5), ("Corona_NLP_test.csv", 3)):
        frame = pd.DataFrame({"UserName": range(rows), "ScreenName": range(100, 100 + rows), "Location": "Zürich",
                              "TweetAt": "02-03-2020", "OriginalTweet": [f"caf\u00e9 tweet {i}" for i in range(rows)],
                              "Sentiment": "Extremely Positive"})
        frame.to_csv(folder / name, index=False, encoding="latin-1")
    return folder


def test_split_sizes_are_the_studys_or_its_proportions():
    assert prepare.split_sizes(25000, prepare.LEGAL_SPLITS) == {"train": 17000, "validation": 2000, "test": 1000}
    assert prepare.split_sizes(20, prepare.LEGAL_SPLITS) == {"train": 17, "validation": 2, "test": 1}


def test_prepare_legal_and_covid_write_what_the_catalogue_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LORALAND_HOME", str(tmp_path / "home"))
    assert cli.main(["data", "prepare", "legal", "--from", str(_legal_download(tmp_path / "legal"))]) == 0
    legal = {split: pd.read_csv(prepare.task_dir("legal") / f"{split}.csv")
             for split in ("train", "validation", "test")}
    assert {split: len(frame) for split, frame in legal.items()} == {"train": 17, "validation": 2, "test": 1}
    assert sorted(pd.concat(legal.values())["clause_text"]) == sorted(
        f"{k} clause {i}, with a comma" for k in ("governing-laws", "confidentiality") for i in range(10))
    again = prepare.prepare_legal(tmp_path / "legal")
    assert again["test"].equals(legal["test"]), "the split is seeded"
    assert prepare.prepare("covid", _covid_download(tmp_path / "covid")) == {"train": 5, "test": 3}
    task = load_catalog().task("covid")
    rows = load_rows(task.dataset, "test", None, task.columns)
    assert len(rows) == 3 and rows[0]["OriginalTweet"] == "caf\u00e9 tweet 0" and rows[0]["Location"] == "Zürich"


def test_prepare_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("LORALAND_HOME", str(tmp_path / "home"))
    assert cli.main(["data", "prepare", "glue_sst2", "--from", str(tmp_path)]) == 2
    assert "no preparer for task 'glue_sst2'" in capsys.readouterr().err
    assert cli.main(["data", "prepare", "covid", "--from", str(tmp_path)]) == 2
    assert "Corona_NLP_train.csv not found" in capsys.readouterr().err
    task = load_catalog().task("legal")
    with pytest.raises(NotFound, match="loraland data prepare legal --from"):
        load_rows(task.dataset, "test", None, task.columns)
