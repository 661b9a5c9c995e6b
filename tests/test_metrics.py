"""Answer parsing and scoring (jobs.metrics): table-driven cases for every answer kind and metric."""

from __future__ import annotations

import math

import pytest

from jobs.metrics import normalize, parse_answer, rouge_l, score

pytestmark = pytest.mark.unit

SST2 = ["negative", "positive"]
COLA = ["unacceptable", "acceptable"]
COVID = ["Extremely Negative", "Negative", "Neutral", "Positive", "Extremely Positive"]
MMLU = ["1", "2", "3", "4"]
LETTERS = ["A", "B", "C", "D"]
ARC = ["A", "B", "C", "D", "E", "1", "2", "3", "4", "5"]


# --------------------------------------------------------------------------- normalize


@pytest.mark.parametrize(
    "text, expected",
    [
        ("positive", "positive"),
        ("  Positive.  ", "positive"),
        ('"Positive"', "positive"),
        ("'yes'", "yes"),
        ("**Yes**", "yes"),
        ("(B)", "b"),
        ("Hello,   World!", "hello, world"),
        ("\tcheck\n balance \n", "check balance"),
        ("-3.5", "-3.5"),
        (".5", ".5"),
        ("\u201cneutral\u201d", "neutral"),
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


# --------------------------------------------------------------------------- parse_answer


@pytest.mark.parametrize(
    "text, labels, expected",
    [
        ("Positive", None, "positive"),
        ("  Positive.\nThe review is glowing.", None, "positive"),
        ("\n\n  check balance \n", None, "check balance"),
        (" positive", SST2, "positive"),
        ("Negative sentiment overall", SST2, "negative"),
        ("acceptable", COLA, "acceptable"),
        ("Unacceptable.", COLA, "unacceptable"),  # the longer label wins, not a prefix of it
        ("Extremely Negative", COVID, "Extremely Negative"),
        ("negative", COVID, "Negative"),
        ("negatively", SST2, "negatively"),  # a label must end at a word boundary
        ("I think it is positive", SST2, "i think it is positive"),  # no label at the start
    ],
)
def test_parse_exact(text, labels, expected):
    assert parse_answer("exact", text, labels) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("yes", True),
        ("Yes.", True),
        (" YES, they are paraphrases", True),
        ("true", True),
        ("True", True),
        ("1", True),
        ("positive", True),
        ("no", False),
        ("No!", False),
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("negative", False),
        ("\nno\nyes", False),  # first non-blank line
        ("maybe", None),
        ("entailment", None),
        ("", None),
        ("nope", None),
    ],
)
def test_parse_boolean(text, expected):
    assert parse_answer("boolean", text) is expected


@pytest.mark.parametrize(
    "text, labels, expected",
    [
        ("3", MMLU, "3"),
        (" 2\n", MMLU, "2"),
        ("The answer is 4.", MMLU, "4"),
        ("Option (1) is right", MMLU, "1"),
        ("10 options, none fit", MMLU, None),  # "10" is not the label "1"
        ("5", MMLU, None),
        ("B", LETTERS, "B"),
        ("(C) because of the arch", LETTERS, "C"),
        ("a good answer is D", LETTERS, "D"),  # capital letters first: the article "a" is no answer
        ("d", LETTERS, "D"),  # lower case when nothing else matches
        ("Answer: E", ARC, "E"),
        ("3", ARC, "3"),
        ("nothing here", LETTERS, None),
        ("2", None, "2"),
        ("it is B", None, "B"),
    ],
)
def test_parse_choice(text, labels, expected):
    assert parse_answer("choice", text, labels) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72.0),
        ("The answer is 1,000.", 1000.0),
        ("#### 1,234,567", 1234567.0),
        ("It costs $12.50 in total", 12.5),
        ("The temperature fell to -4 degrees", -4.0),
        ("5-3=2", 2.0),
        ("7 apples, then 3", 3.0),
        ("1, 2, 3", 3.0),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_parse_last_number(text, expected):
    assert parse_answer("last_number", text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3.8", 3.8),
        (" 4.0 out of 5", 4.0),
        ("Score: 2,500 then 3", 2500.0),
        ("-1", -1.0),
        ("similarity .5", 0.5),
        ("high", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_answer("number", text) == expected


def test_parse_text_and_code():
    assert parse_answer("text", "  As Is \n") == "  As Is \n"
    assert parse_answer("code", "    return a + b\n") == "    return a + b\n"
    fenced = "Here you go:\n```python\ndef f():\n    return 1\n```\nDone."
    assert parse_answer("code", fenced) == "def f():\n    return 1\n"
    # the first Python (or untagged) block, after any block in another language
    mixed = "Run:\n```bash\npip install x\n```\nThen:\n```Python\n    return 2\n```\n```python\n    return 3\n```"
    assert parse_answer("code", mixed) == "    return 2\n"
    assert parse_answer("code", "```\n    return 4\n```") == "    return 4\n"
    assert parse_answer("code", "```py\n    return 5") == "    return 5"  # cut off before the closing fence
    assert parse_answer("code", "```bash\nls\n```") == "```bash\nls\n```"  # no Python block: as is


def test_parse_unknown_kind():
    with pytest.raises(ValueError, match="unknown answer kind"):
        parse_answer("regex", "x")


# --------------------------------------------------------------------------- rouge_l


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        ("The Cat, sat on the mat!", "the cat sat on the mat", 1.0),  # case and punctuation ignored
        ("alpha beta", "gamma delta", 0.0),
        ("", "the cat", 0.0),
        ("the cat", "", 0.0),
        ("!!!", "???", 0.0),
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS 5 of 6 and 6
        ("a b c", "a x c y", 4 / 7),  # LCS 2: P 2/3, R 1/2, F 2PR/(P+R) = 4/7
        ("police killed the gunman", "the gunman kill police", 0.5),  # LCS "the gunman": P = R = 1/2
        # rouge_score's README example: rougeL fmeasure 0.5882352941176471 (P 5/8, R 5/9)
        ("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog", 0.5882352941176471),
    ],
)
def test_rouge_l(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)


# --------------------------------------------------------------------------- score


@pytest.mark.parametrize(
    "answer, prediction, gold, labels, expected",
    [
        ("exact", " Positive.", "positive", SST2, 1.0),
        ("exact", "negative", "positive", SST2, 0.0),
        ("exact", "Check Balance", "check balance", None, 1.0),
        ("exact", "", "positive", SST2, 0.0),
        ("boolean", "Yes, both ask the same", "yes", ["yes", "no"], 1.0),
        ("boolean", "true", "yes", None, 1.0),
        ("boolean", "no", "yes", None, 0.0),
        ("boolean", "unsure", "no", None, 0.0),  # unparsable prediction scores 0
        ("choice", "The answer is 3", "3", MMLU, 1.0),
        ("choice", "2", "3", MMLU, 0.0),
        ("choice", "B", "B", LETTERS, 1.0),
        ("choice", "none", "B", LETTERS, 0.0),
        ("last_number", "She sold 72 clips. #### 72", "Natalia ... <<48+24=72>>72.\n#### 72", None, 1.0),
        ("last_number", "The total is 1,000", "#### 1000", None, 1.0),
        ("last_number", "The total is 1000.0000001", "#### 1000", None, 1.0),  # within 1e-6
        ("last_number", "The total is 1000.01", "#### 1000", None, 0.0),
        ("last_number", "I do not know", "#### 0", None, 0.0),
    ],
)
def test_score_accuracy(answer, prediction, gold, labels, expected):
    assert score("accuracy", answer, prediction, gold, labels) == expected


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        ("3.8", "3.8", 1.0),
        ("4.0", "3.0", 0.8),  # partial credit: 1 - 1/5
        ("0.0", "5.0", 0.0),
        ("2.5", "5.0", 0.5),
        ("7", "5.0", 1.0),  # clipped to 5
        ("9.5", "4.0", 0.8),  # clipped to 5, then 1 - 1/5
        ("-2", "1.0", 0.8),  # clipped to 0, then 1 - 1/5
        ("similar", "3.0", 0.0),  # unparsable
        ("Score: 3.5 out of 5", "3.0", 0.9),  # first number
    ],
)
def test_score_stsb(prediction, gold, expected):
    assert score("stsb_similarity", "number", prediction, gold) == pytest.approx(expected)


def test_score_stsb_needs_a_numeric_gold():
    with pytest.raises(ValueError, match="gold"):
        score("stsb_similarity", "number", "3", "n/a")


def test_score_rouge_is_rouge_l():
    assert score("rouge", "text", "the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert score("rouge", "text", "x", "x") == 1.0


def test_score_humaneval_points_to_the_sandbox():
    with pytest.raises(ValueError, match="jobs.sandbox"):
        score("humaneval", "code", "    return 1", "")


def test_score_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "text", "a", "a")


def test_scores_are_in_unit_interval():
    for metric, answer, pred, gold in [
        ("accuracy", "exact", "x", "x"),
        ("rouge", "text", "a b", "b c"),
        ("stsb_similarity", "number", "100", "0"),
    ]:
        value = score(metric, answer, pred, gold)
        assert 0.0 <= value <= 1.0 and not math.isnan(value)
