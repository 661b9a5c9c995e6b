"""Task-complexity heuristics the LoRA Land study correlated with its results (Zhao et al. 2024, section 6).

Per task, from a seeded random sample of its training examples (`sample_rows`: the same SAMPLE_ROWS
rows every time, drawn from the whole split, not its head; prompt = input, gold completion = output):
- input, output and total length in tokens: p95, mean, standard deviation;
- input-output similarity: ROUGE-L F (jobs.metrics.rouge_l) of the output against the input, mean and std;
- compressibility: zlib-compressed bytes / raw bytes of prompt + completion, mean and std;
- number of training examples.

Lengths are counted in the study's unit, tiktoken's cl100k_base tokens, when tiktoken is installed and its
cl100k_base file is already in tiktoken's cache (`cl100k_cache_file`: TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR,
else <tmp>/data-gym-cache; it is never downloaded here: copy the file there, or let tiktoken fetch it once).
Otherwise they are counted in the tokens of a base model of the sweep, with the first tokenizer that loads
(`length_unit`): a tiny model's, built locally, or a real model's from the Hugging Face cache or, unless
HF_HUB_OFFLINE is set, downloaded from the Hub (the tokenizer's files only, never the weights; a gated
model without a token is skipped). Only when none loads are they whitespace-separated words. The unit's
name (`tokens (cl100k_base, the study's unit)`, `tokens (tiny-llama tokenizer)` or `words`) goes into the report
next to the numbers, with a note when it is not the study's (`unit_note`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import statistics
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.schemas import BaseModelSpec
from jobs.metrics import rouge_l

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Tokenize = Callable[[str], Sequence[Any]]

SAMPLE_ROWS = 200
SAMPLE_SEED = 0
HEURISTICS = (
    "input_tokens_p95", "input_tokens_mean", "input_tokens_std",
    "output_tokens_p95", "output_tokens_mean", "output_tokens_std",
    "total_tokens_p95", "total_tokens_mean", "total_tokens_std",
    "io_rouge_l_mean", "io_rouge_l_std",
    "compressibility_mean", "compressibility_std",
    "train_examples",
)


def whitespace_tokens(text: str) -> list[str]:
    """The fallback length unit: words separated by whitespace."""
    return text.split()


@dataclass(frozen=True)
class LengthUnit:
    """How the length heuristics count: `name` is what the report says (`tokens (tiny-llama tokenizer)`, `words`)."""

    name: str
    tokenize: Tokenize


WORDS = LengthUnit("words", whitespace_tokens)
STUDY_UNIT = "tokens (cl100k_base, the study's unit)"
# Where tiktoken fetches cl100k_base from and the SHA-256 it checks (tiktoken_ext/openai_public.py): a cached file
# is named after the SHA-1 of this address, and one with another hash is deleted and fetched again.
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


def cl100k_cache_file() -> Path | None:
    """tiktoken's cached cl100k_base file when it is there and intact (so loading it needs no network), else None.

    Follows tiktoken's own lookup (tiktoken/load.py `read_file_cached`): TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR,
    else <tmp>/data-gym-cache; an empty setting turns tiktoken's cache off, so there is nothing to find.
    """
    import tempfile

    folder = os.environ.get("TIKTOKEN_CACHE_DIR")
    if folder is None:
        folder = os.environ.get("DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    path = Path(folder) / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    if not folder or not path.is_file():
        return None
    return path if hashlib.sha256(path.read_bytes()).hexdigest() == CL100K_SHA256 else None


def study_unit() -> LengthUnit | None:
    """The study's unit, cl100k_base tokens, when tiktoken is installed and its file is cached (`cl100k_cache_file`)."""
    if cl100k_cache_file() is None:
        return None
    try:
        import tiktoken

        encoding = tiktoken.get_encoding("cl100k_base")
    except Exception as error:  # not installed, or a cache tiktoken does not accept: the next unit is used
        log.info("cl100k_base not available: %s", error)
        return None
    return LengthUnit(STUDY_UNIT, partial(encoding.encode, disallowed_special=()))


def unit_note(name: str) -> str:
    """What the report adds after a unit's name: nothing for the study's unit, else which unit the study used."""
    return "" if name == STUDY_UNIT else " (the study counted tiktoken's cl100k_base tokens, not cached here)"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set (to 1/true/yes/on): no download is tried."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def local_tokenizer(spec: BaseModelSpec) -> PreTrainedTokenizerBase | None:
    """A base model's tokenizer (a tiny model's, a cached copy, or, unless `hub_offline()`, its tokenizer
    files downloaded from the Hub), else None."""
    from transformers import AutoTokenizer

    from jobs.models import model_source

    try:
        return AutoTokenizer.from_pretrained(model_source(spec), local_files_only=hub_offline())
    except Exception as error:
        log.info("tokenizer of %s not available: %s", spec.name, error)
        return None


def length_unit(base_models: Iterable[str]) -> LengthUnit:
    """The study's cl100k_base tokens when they can be had offline (`study_unit`); else the tokens of the first of
    `base_models` (catalogue names; unknown ones skipped) whose tokenizer loads (`local_tokenizer`); whitespace words,
    labelled `words`, when none does."""
    from core.catalog import load_catalog

    study = study_unit()
    if study is not None:
        return study
    catalog, names = load_catalog(), list(base_models)
    for name in names:
        tokenizer = local_tokenizer(catalog.base_models[name]) if name in catalog.base_models else None
        if tokenizer is not None:
            return LengthUnit(f"tokens ({name} tokenizer)", partial(tokenizer.encode, add_special_tokens=False))
    log.warning("no tokenizer of %s loads%s: task lengths are counted in words",
                ", ".join(names) or "no base model", " (HF_HUB_OFFLINE is set)" if hub_offline() else "")
    return WORDS


def summary(values: Sequence[float], prefix: str, p95: bool = True) -> dict[str, float]:
    """`{prefix}_p95` (numpy's percentile: linear between closest ranks), `{prefix}_mean`, `{prefix}_std` (population
    std) of `values`; NaN when empty."""
    names = ("p95", "mean", "std") if p95 else ("mean", "std")
    if not values:
        return {f"{prefix}_{name}": math.nan for name in names}
    figures = {
        "p95": float(np.percentile(values, 95)),
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
    }
    return {f"{prefix}_{name}": figures[name] for name in names}


def compressibility(text: str) -> float:
    """zlib-compressed size / raw size of the UTF-8 text (lower = more redundant); NaN for empty text."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / len(raw) if raw else math.nan


def example_heuristics(inputs: Sequence[str], outputs: Sequence[str], train_examples: int,
                       tokenize: Tokenize) -> dict[str, float]:
    """Every heuristic of HEURISTICS from paired inputs (prompts) and outputs (gold completions),
    lengths counted by `tokenize` (a LengthUnit's)."""
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
    input_lengths = [float(len(tokenize(text))) for text in inputs]
    output_lengths = [float(len(tokenize(text))) for text in outputs]
    values = summary(input_lengths, "input_tokens") | summary(output_lengths, "output_tokens")
    values |= summary([a + b for a, b in zip(input_lengths, output_lengths)], "total_tokens")
    values |= summary([rouge_l(out, inp) for inp, out in zip(inputs, outputs)], "io_rouge_l", p95=False)
    values |= summary(
        [compressibility(f"{inp} {out}") for inp, out in zip(inputs, outputs)], "compressibility", p95=False
    )
    values["train_examples"] = float(train_examples)
    return values


def sample_rows(rows: Sequence[Any], limit: int, seed: int = SAMPLE_SEED) -> list[Any]:
    """`limit` of `rows` drawn at random without replacement (seeded: the same rows every time), in their
    original order; all of them when there are no more than `limit`."""
    if len(rows) <= limit:
        return list(rows)
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]


def task_examples(task: Any, limit: int = SAMPLE_ROWS) -> tuple[list[str], list[str]]:
    """A seeded random sample (`sample_rows`) of `limit` training examples of a task (jobs.config.TaskSpec)
    as (prompts, completions), the prompts with the task's worked examples as its jobs show them."""
    from core.prompts import completion_for, prompt_for
    from jobs.data import example_rows, train_rows

    rows, worked = sample_rows(train_rows(task), limit), example_rows(task)
    return [prompt_for(task, row, examples=worked) for row in rows], [completion_for(task, row) for row in rows]


def train_size(task: Any) -> int:
    """Number of training examples: the Hub's split metadata for Hub datasets (no full download),
    else the rows on disk or generated."""
    from jobs.data import train_rows

    source = task.dataset
    if source.kind == "hf":
        try:
            import datasets

            configs = source.config.split("+") if source.config else [None]
            return sum(
                datasets.load_dataset_builder(source.id, c).info.splits[source.train_split].num_examples
                for c in configs
            )
        except Exception:
            pass
    return len(train_rows(task))


def task_heuristics(task: Any, tokenize: Tokenize, limit: int = SAMPLE_ROWS) -> dict[str, float]:
    """Every heuristic for one task, from a seeded sample of `limit` training examples, lengths counted by
    `tokenize`."""
    prompts, completions = task_examples(task, limit)
    return example_heuristics(prompts, completions, train_size(task), tokenize)
