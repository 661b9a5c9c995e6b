"""The LoRA Land study's own scoring rules, as named functions (`evaluation.scoring: study`).

Each function scores one raw generation against one gold target the way the study's evaluation
harness did (facts from shared/reference/lora_land_task_formats.yaml, `defaults.metric_rules`;
the code here is our own). The rules are looser than `jobs.metrics` (`evaluation.scoring: strict`):
labels are found anywhere in the text, in a fixed priority order, so a digit beats a word and
"no" is found inside "not". Nothing is stripped from the generation before scoring.

A generation that failed (None: the request returned no text) is left out of the mean and counted
(`mean_of_answered`), as the study did. Tasks whose study metric has no function in the study's
code (arc_combined, covid, winogrande, magicoder) have no entry here; they are scored strictly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jobs.metrics import rouge_l

__all__ = [
    "STUDY_METRICS", "DBPEDIA_CLASSES", "StudyTally", "exact_step", "flex_boolean", "binary_accuracy_flex",
    "mnli_accuracy", "mrpc_accuracy", "hellaswag_accuracy", "customer_support_accuracy", "mmlu_accuracy",
    "rouge", "stsb", "dbpedia", "gsm8k_regex", "mean_of_answered", "study_score",
]

DBPEDIA_CLASSES = (
    "Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder", "MeanOfTransportation", "Building",
    "NaturalPlace", "Village", "Animal", "Plant", "Album", "Film", "WrittenWork",
)

# Substring -> boolean, tested in this order (digits first, then words, case-insensitively).
_FLEX_ORDER = (("1", True), ("0", False), ("yes", True), ("no", False), ("true", True), ("false", False),
               ("positive", True), ("negative", False))
_FIRST_NUMBER_RE = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
_UNSIGNED_RE = re.compile(r"\d+(?:\.\d+)?")
_GSM8K_RE = re.compile(r"-?[\d$.,]{2,}|-?\d+")


def _as_float(text: str) -> float | None:
    """`float(text)` (surrounding whitespace allowed, as Python's float does), or None when it does not parse."""
    try:
        return float(text)
    except ValueError:
        return None


def exact_step(output: str, target: object) -> bool:
    """The shared first step: equal after removing surrounding periods (only periods) and lower-casing; or the whole
    output parses as a float whose text form ("1.0") equals the whitespace-stripped target text."""
    out, gold = str(output), str(target)
    if out.strip(".").lower() == gold.strip(".").lower():
        return True
    value = _as_float(out)
    return value is not None and str(value) == gold.strip()


def flex_boolean(text: object) -> bool | None:
    """True/False from the first of 1, 0, yes, no, true, false, positive, negative found anywhere in the lower-cased
    text (so "10" is True and "not" is False); None when none is found."""
    lowered = str(text).lower()
    for needle, value in _FLEX_ORDER:
        if needle in lowered:
            return value
    return None


def binary_accuracy_flex(output: str, target: object) -> float:
    """1.0 when output and target both map to a boolean (`flex_boolean`) and agree, else 0.0."""
    pred, gold = flex_boolean(output), flex_boolean(target)
    return 1.0 if pred is not None and pred == gold else 0.0


def _digit_in_both(output: str, target: object, digits: str) -> bool:
    """Whether one of `digits` occurs in both texts (several digits in the output count for any of them)."""
    gold = str(target)
    return any(d in output and d in gold for d in digits)


def mnli_accuracy(output: str, target: object) -> float:
    """`exact_step`, else correct when the target's digit (0, 1 or 2) occurs anywhere in the output."""
    return 1.0 if exact_step(output, target) or _digit_in_both(output, target, "012") else 0.0


def mrpc_accuracy(output: str, target: object) -> float:
    """`exact_step`, else correct when 1 (or 2) occurs in both; no fallback for 0, so a target 0 needs the exact
    step."""
    return 1.0 if exact_step(output, target) or _digit_in_both(output, target, "12") else 0.0


def hellaswag_accuracy(output: str, target: object) -> float:
    """`exact_step`, else correct when the target's digit (0-3) occurs anywhere in the output."""
    return 1.0 if exact_step(output, target) or _digit_in_both(output, target, "0123") else 0.0


def customer_support_accuracy(output: str, target: object) -> float:
    """`exact_step`, else correct when the lower-cased target occurs anywhere in the lower-cased output."""
    return 1.0 if exact_step(output, target) or str(target).lower() in output.lower() else 0.0


def _first_number(text: str) -> str | None:
    """The first unsigned number (comma thousands and decimals allowed) as written, or None."""
    found = _FIRST_NUMBER_RE.search(text)
    return found.group() if found else None


def mmlu_accuracy(output: str, target: object) -> float:
    """`exact_step`, else correct when the first numbers of output and target are the same string (or both lack one)."""
    return 1.0 if exact_step(output, target) or _first_number(output) == _first_number(str(target)) else 0.0


def rouge(output: str, target: object) -> float:
    """ROUGE-L F-measure of the output against the target (lower-cased alphanumeric tokens, no stemming)."""
    return rouge_l(output, str(target))


def _stsb_value(text: str) -> float | None:
    """The whole text as a float (no range check); else its first unsigned number when within [0, 5]; else None.
    A value that is not finite ("nan", "inf") counts as no number here (a choice of ours: the study's is undefined)."""
    value = _as_float(text)
    if value is None:
        found = _UNSIGNED_RE.search(text)
        value = float(found.group()) if found else None
        if value is not None and not 0.0 <= value <= 5.0:
            return None
    return value if value is not None and math.isfinite(value) else None


def stsb(output: str, target: object) -> float:
    """1 - |prediction - target| / 5, both read by `_stsb_value`; 0.0 when either has no number. An output that is a
    bare number is taken as is, so 7 scores 0.6 against 5 and a large value can score below 0."""
    pred, gold = _stsb_value(output), _stsb_value(str(target))
    if pred is None or gold is None:
        return 0.0
    return 1.0 - abs(pred - gold) / 5.0


def dbpedia(output: str, target: object) -> float:
    """ROUGE-L F of the output against the class name, after an all-integer output in 0..13 is replaced by the class
    name at that 0-based index. Not exact accuracy: extra words lower the score."""
    try:
        index = int(output)
    except ValueError:
        index = -1
    text = DBPEDIA_CLASSES[index] if 0 <= index < len(DBPEDIA_CLASSES) else output
    return rouge_l(text, str(target))


def _last_gsm8k_number(text: str) -> float | None:
    """The last number-like run of `text`, its $ and . ends stripped and commas deleted, as a float; else None."""
    runs = _GSM8K_RE.findall(text)
    if not runs:
        return None
    return _as_float(runs[-1].strip("$.").replace(",", ""))


def gsm8k_regex(output: str, target: object) -> float:
    """1.0 when the last number of the output equals the last number of the target (the answer after "####")."""
    pred, gold = _last_gsm8k_number(output), _last_gsm8k_number(str(target))
    return 1.0 if pred is not None and gold is not None and pred == gold else 0.0


StudyRule = Callable[[str, object], float]

STUDY_METRICS: dict[str, StudyRule] = {
    "binary_accuracy_flex": binary_accuracy_flex,
    "mnli_accuracy": mnli_accuracy,
    "mrpc_accuracy": mrpc_accuracy,
    "hellaswag_accuracy": hellaswag_accuracy,
    "customer_support_accuracy": customer_support_accuracy,
    "mmlu_accuracy": mmlu_accuracy,
    "rouge": rouge,
    "stsb": stsb,
    "dbpedia": dbpedia,
    "gsm8k_regex": gsm8k_regex,
}


def study_score(metric_name: str, output: str | None, target: object) -> float | None:
    """Score one generation with the named study metric; None for a failed generation (no text), which is left out."""
    if metric_name not in STUDY_METRICS:
        raise ValueError(f"unknown study metric {metric_name!r}; expected one of {', '.join(STUDY_METRICS)}")
    return None if output is None else STUDY_METRICS[metric_name](output, target)


@dataclass(frozen=True)
class StudyTally:
    """A task's score the study's way: the mean over answered examples, and how many failed and were left out."""

    mean: float
    answered: int
    failed: int


def mean_of_answered(scores: Sequence[float | None]) -> StudyTally:
    """The plain mean of the scores that are not None (0.0 when none is), with the count of None (failed) ones."""
    answered = [s for s in scores if s is not None]
    return StudyTally(sum(answered) / len(answered) if answered else 0.0, len(answered), len(scores) - len(answered))
