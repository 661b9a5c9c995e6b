"""Answer parsing and scoring, following the LoRA Land study's output-parsing rules.

The study (Zhao et al., 2024, "LoRA Land", see shared/reference/README.md) scores a generation by
parsing it the same way as the gold completion and comparing:

- exact match after strip / lower-case (`answer: exact`), parsed a little more loosely than the
  study states, by choice (see below);
- yes/no, true/false, 1/0 and positive/negative normalised to booleans (`answer: boolean`);
- multiple choice scores the label (digit or letter) found in the output (`answer: choice`);
- gsm8k compares the last number (`answer: last_number`);
- ROUGE means ROUGE-L F-measure (`metric: rouge`);
- glue_stsb scores 1 - |pred - gold| / 5 (`metric: stsb_similarity`).

HumanEval (`metric: humaneval`) runs untrusted code and lives in `jobs.sandbox`.
Only the standard library is used here.

Deliberate deviation from "exact match after strip / lower-case": `answer: exact` compares only the
first non-blank line of the text; on it, runs of whitespace collapse to one space, surrounding
quotes and emphasis marks (" ' ` curly quotes, guillemets, *) and punctuation (`,;:!?` on both
sides, `.` on the right only, so ".5" and "-3" survive) are stripped, as are matching surrounding
brackets ((), [], {}, <>), repeatedly; and when the task has `labels`, a line that starts with a
label as whole words ("positive, because ...") counts as that label (the longest label wins, so
`not_entailment` is not read as `entailment`). So `'"Positive."'`, `**positive**` and
`positive\nIt was great` all match a gold of `positive`, where the bare rule would score them 0.
`boolean` reads the first word of that same normalised line. The rules are the same for every
model, base or fine-tuned, and for the gold completions, so comparisons between models are fair;
absolute accuracies can be a little higher than under the bare rule.
"""

from __future__ import annotations

import math
import re

__all__ = ["normalize", "parse_answer", "rouge_l", "score", "ANSWER_KINDS", "METRICS"]

ANSWER_KINDS = ("exact", "boolean", "choice", "last_number", "number", "text", "code")
METRICS = ("accuracy", "rouge", "stsb_similarity", "humaneval")

NUMBER_TOLERANCE = 1e-6

# Quotes and emphasis markers are stripped on both sides; sentence punctuation mostly on the right.
# A leading "." or "-" is kept so ".5" and "-3" survive normalisation.
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb*"
_LEFT_STRIP = _QUOTES + ",;:!?" + " \t\r\n"
_RIGHT_STRIP = _QUOTES + ".,;:!?" + " \t\r\n"
_BRACKETS = (("(", ")"), ("[", "]"), ("{", "}"), ("<", ">"))

# A number: optional minus (not when glued to a preceding word/digit, so "5-3" is 5 and 3),
# digits with optional thousands commas ("1,000"), optional decimals; or a bare ".5".
_NUMBER_RE = re.compile(r"(?:(?<![\w.])-)?(?:(?<![\d.])\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")
_WORD_RE = re.compile(r"[a-z0-9]+")
_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = frozenset({"", "python", "python3", "py"})

_TRUE_WORDS = frozenset({"yes", "true", "1", "positive"})
_FALSE_WORDS = frozenset({"no", "false", "0", "negative"})


def normalize(text: str) -> str:
    """Strip, lower-case, collapse runs of whitespace, and remove surrounding quotes/punctuation.

    `' "Positive." '` -> `positive`; `(B)` -> `b`; `**yes**` -> `yes`; `-3.5` stays `-3.5`.
    """
    s = " ".join(str(text).split()).lower()
    previous = None
    while s != previous:
        previous = s
        s = s.lstrip(_LEFT_STRIP).rstrip(_RIGHT_STRIP)
        for left, right in _BRACKETS:
            if len(s) >= 2 and s.startswith(left) and s.endswith(right):
                s = s[1:-1]
    return s


def _first_line(text: str) -> str:
    """The first line of `text` that is not blank ("" when there is none)."""
    for line in str(text).splitlines():
        if line.strip():
            return line
    return ""


def _numbers(text: str) -> list[float]:
    """Every number in `text`, in order, as floats ("1,000" -> 1000.0, "-2.5" -> -2.5)."""
    return [float(m.group().replace(",", "")) for m in _NUMBER_RE.finditer(str(text))]


def _label_match(text: str, labels: list[str]) -> str | None:
    """The label whose normalised form is the normalised `text`, or that `text` starts with as whole words.

    Longer labels win, so `not_entailment` is not read as `entailment`.
    """
    by_norm = sorted(((normalize(label), label) for label in labels), key=lambda p: -len(p[0]))
    for norm, label in by_norm:
        if norm and text == norm:
            return label
    for norm, label in by_norm:
        if norm and text.startswith(norm) and not text[len(norm) : len(norm) + 1].isalnum():
            return label
    return None


def _find_choice(text: str, labels: list[str] | None) -> str | None:
    """The label found first as a standalone token of `text` (case-sensitive first, then not)."""
    if labels:
        candidates = [str(label) for label in labels if str(label).strip()]
        for flags in (0, re.IGNORECASE):
            best: tuple[int, int, str] | None = None
            for label in candidates:
                pattern = r"(?<![A-Za-z0-9])" + re.escape(label.strip()) + r"(?![A-Za-z0-9])"
                found = re.search(pattern, text, flags)
                if found and (best is None or (found.start(), -len(label)) < (best[0], best[1])):
                    best = (found.start(), -len(label), label)
            if best is not None:
                return best[2]
        return None
    # No labels given: a single digit, or a single capital letter (a lower-case "a" is an article).
    found = re.search(r"(?<![A-Za-z0-9])([0-9]|[A-Z])(?![A-Za-z0-9])", text)
    return found.group(1) if found else None


def _extract_code(text: str) -> str:
    """The body of the first fenced Python (```python, ```py or untagged ```) block in `text`, or `text` unchanged."""
    for found in _FENCE_RE.finditer(text):
        if found.group(1).lower() in _PYTHON_TAGS:
            return found.group(2)
    return text


def parse_answer(kind: str, text: str, labels: list[str] | None = None) -> str | bool | float | None:
    """Parse a generation (or a gold completion) as the task's `answer` kind says.

    - `exact`: the normalised first non-blank line; with `labels`, the label it equals or starts
      with (as whole words), else the normalised line itself.
    - `boolean`: True for yes/true/1/positive, False for no/false/0/negative (the first word of
      the first line), else None.
    - `choice`: the label (e.g. "0".."3" or "A".."D") found first as a standalone token, else None.
      Without `labels`, a single digit or capital letter.
    - `last_number` / `number`: the last / first number as a float ("1,000" -> 1000.0), else None.
    - `text`: the text unchanged.
    - `code`: the body of the first fenced Python (or untagged) code block, else the text unchanged.
    """
    text = "" if text is None else str(text)
    if kind == "exact":
        line = normalize(_first_line(text))
        if labels:
            return _label_match(line, labels) or line
        return line
    if kind == "boolean":
        words = _WORD_RE.findall(normalize(_first_line(text)))
        if not words:
            return None
        if words[0] in _TRUE_WORDS:
            return True
        if words[0] in _FALSE_WORDS:
            return False
        return None
    if kind == "choice":
        return _find_choice(text, labels)
    if kind == "last_number":
        numbers = _numbers(text)
        return numbers[-1] if numbers else None
    if kind == "number":
        numbers = _numbers(text)
        return numbers[0] if numbers else None
    if kind == "text":
        return text
    if kind == "code":
        return _extract_code(text)
    raise ValueError(f"unknown answer kind {kind!r}; expected one of {', '.join(ANSWER_KINDS)}")


def _rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer: lower-case, non-[a-z0-9] become spaces, split."""
    return re.sub(r"[^a-z0-9]+", " ", str(text).lower()).split()


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (two-row dynamic programme)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b, start=1):
            if token_a == token_b:
                current.append(previous[j - 1] + 1)
            else:
                current.append(max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (LCS based) over lower-cased alphanumeric word tokens.

    Matches `rouge_score.rouge_scorer.RougeScorer(["rougeL"])` without stemming: 0.0 when either
    side has no tokens, else 2PR / (P + R) with P = LCS / |prediction|, R = LCS / |reference|.
    """
    pred_tokens = _rouge_tokens(prediction)
    ref_tokens = _rouge_tokens(reference)
    if not pred_tokens or not ref_tokens:
        return 0.0
    lcs = _lcs_length(pred_tokens, ref_tokens)
    if lcs == 0:
        return 0.0
    precision = lcs / len(pred_tokens)
    recall = lcs / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _same(pred: object, gold: object) -> bool:
    """Equality, with numbers compared to within NUMBER_TOLERANCE."""
    if isinstance(pred, float) and isinstance(gold, float):
        return math.isclose(pred, gold, rel_tol=0.0, abs_tol=NUMBER_TOLERANCE)
    return pred == gold


def score(metric: str, answer: str, prediction: str, gold: str, labels: list[str] | None = None) -> float:
    """Score one generation against its gold completion, in [0, 1].

    - `accuracy`: 1.0 when the parsed prediction is not None and equals the parsed gold (numbers
      within 1e-6; gsm8k gold like "... #### 72" parses to 72 with `last_number`).
    - `rouge`: ROUGE-L F-measure of the raw texts.
    - `stsb_similarity`: max(0, 1 - |pred - gold| / 5), pred clipped to [0, 5]; 0.0 when the
      prediction has no number. A gold without a number is a data error (ValueError).
    - `humaneval`: not scored here; raises ValueError (use `jobs.sandbox`).
    """
    if metric == "accuracy":
        pred = parse_answer(answer, prediction, labels)
        if pred is None:
            return 0.0
        return 1.0 if _same(pred, parse_answer(answer, gold, labels)) else 0.0
    if metric == "rouge":
        return rouge_l(prediction, gold)
    if metric == "stsb_similarity":
        kind = answer if answer in ("number", "last_number") else "number"
        gold_value = parse_answer(kind, gold)
        if not isinstance(gold_value, float):  # number kinds parse to a float or None
            raise ValueError(f"stsb_similarity: the gold completion {gold!r} holds no number")
        pred_value = parse_answer(kind, prediction)
        if not isinstance(pred_value, float) or math.isnan(pred_value):
            return 0.0
        pred_value = min(5.0, max(0.0, pred_value))
        return max(0.0, 1.0 - abs(pred_value - gold_value) / 5.0)
    if metric == "humaneval":
        raise ValueError(
            "the humaneval metric runs generated code; score it with jobs.sandbox "
            "(humaneval_pass / pass_at_1), not jobs.metrics.score"
        )
    raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
