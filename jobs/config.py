"""Typed configs for what a worker runs: base models, tasks, and the settings of one job.

Every model rejects unknown keys and describes each field, so `loraland validate` can name the
field at fault. The sweep config (orchestrator) and the serve config (serving) build on these.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, types are strict (`true` is not a rank, "100" is not a step
    count; an integer is a float), numbers are finite, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)


def names_or(keyword: str) -> Any:
    """A `mode="before"` validator for a `list[str] | Literal[keyword]` field: a lone string other than `keyword` gets one
    clear error instead of one per member of the union."""

    def check(value: Any) -> Any:
        if isinstance(value, str) and value != keyword:
            raise ValueError(f"expected a list of names or {keyword!r}; write [{value}] for one name")
        return value

    return check


# --------------------------------------------------------------------------- base models


class Architecture(StrictModel):
    """The shape numbers the memory estimate needs (and, for tiny models, what to build)."""

    num_layers: int = Field(gt=0, description="Number of transformer blocks.")
    hidden_size: int = Field(gt=0, description="Model width.")
    intermediate_size: int = Field(gt=0, description="MLP inner width.")
    vocab_size: int = Field(gt=0, description="Tokenizer vocabulary size (rows of the embedding).")
    num_attention_heads: int = Field(gt=0, description="Query heads.")
    num_key_value_heads: int = Field(gt=0, description="Key/value heads (grouped-query attention).")
    tie_word_embeddings: bool = Field(description="True when the LM head shares the embedding matrix.")
    max_position_embeddings: int = Field(gt=0, description="Longest context the model was trained for.")


ChatFormat = Literal["llama2", "mistral", "zephyr", "gemma", "phi", "plain"]
Family = Literal["llama", "mistral", "gemma", "phi"]


class BaseModelSpec(StrictModel):
    """One base model of the catalogue."""

    name: str = Field(description="Short name used in sweeps, model ids and MLflow tags.")
    hf_id: str = Field(description="Hugging Face id, or `tiny/<name>` for a locally built tiny model.")
    family: Family = Field(description="Architecture family; picks the transformers model class.")
    params_billion: float = Field(gt=0, description="Parameter count in billions.")
    instruction_tuned: bool = Field(description="Whether the published checkpoint is instruction-tuned.")
    chat_format: ChatFormat = Field(description="Chat convention used by /v1/chat/completions.")
    all_linear_modules: list[str] = Field(
        min_length=1, description="Names of every linear projection in a block (LoRA `all-linear`)."
    )
    architecture: Architecture = Field(description="Shape numbers for memory estimates.")
    tiny: bool = Field(default=False, description="A tiny offline counterpart built from config, not downloaded.")


# --------------------------------------------------------------------------- tasks

Category = Literal["classic_nlp", "coding", "knowledge", "reasoning", "math", "demo"]
Metric = Literal["accuracy", "rouge", "stsb_similarity", "humaneval"]
AnswerKind = Literal["exact", "boolean", "choice", "last_number", "number", "text", "code"]


class DatasetSource(StrictModel):
    """Where a task's examples come from."""

    kind: Literal["hf", "kaggle", "local", "demo"] = Field(
        description="hf: `datasets.load_dataset`; kaggle/local: files on disk; demo: generated offline."
    )
    id: str = Field(description="HF dataset id, Kaggle slug, local folder, or demo generator name.")
    config: str | None = Field(default=None, description="HF config name; `A+B` concatenates two configs.")
    train_split: str = Field(default="train", description="Split used for fine-tuning.")
    eval_split: str = Field(description="Split used for evaluation (first `eval_limit` rows).")
    eval_split_size: int | None = Field(default=None, ge=0, description="Rows in the eval split, if known.")
    data_files: dict[str, str] | None = Field(
        default=None, description="split -> file (jsonl/parquet/csv) for kaggle/local sources."
    )


class EvalSource(StrictModel):
    """A separate evaluation set (e.g. HumanEval for a task trained on Magicoder)."""

    dataset: DatasetSource = Field(description="Where the evaluation rows come from.")
    prompt: str = Field(description="Jinja template rendering an evaluation row into the prompt.")
    columns: list[str] = Field(description="Columns of the evaluation rows the template and scorer use.")


class TaskSpec(StrictModel):
    """One task: data, prompt template, metric."""

    name: str = Field(description="Short name used in sweeps, model ids and the registry.")
    category: Category = Field(description="The study's task category.")
    description: str = Field(default="", description="One line a person reads in `loraland catalog`.")
    dataset: DatasetSource = Field(description="Training (and, unless `eval` is set, evaluation) data.")
    columns: list[str] = Field(min_length=1, description="Columns of the real dataset the templates use.")
    prompt: str = Field(description="Jinja template: row -> prompt (completion-style, zero-shot).")
    completion: str = Field(description="Jinja template: row -> gold completion (the training target).")
    metric: Metric = Field(description="The study's metric for this task.")
    answer: AnswerKind = Field(description="How a generated answer is parsed before scoring.")
    labels: list[str] | None = Field(default=None, description="Allowed answers for classification tasks.")
    eval: EvalSource | None = Field(default=None, description="Separate evaluation set, if any.")
    eval_limit: int = Field(default=1000, gt=0, description="Evaluate on at most this many rows.")
    max_new_tokens: int = Field(default=256, gt=0, description="Generation budget at evaluation.")
    mean_example_tokens: int = Field(default=256, gt=0, description="Rough tokens per example (for `plan`).")


# --------------------------------------------------------------------------- job settings


class LoraSettings(StrictModel):
    """LoRA hyper-parameters (the study's defaults)."""

    r: int = Field(default=8, gt=0, description="LoRA rank.")
    alpha: int = Field(default=16, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Module names to adapt, or `all-linear` for every projection of the block.",
    )

    _targets = field_validator("target_modules", mode="before")(names_or("all-linear"))


class QuantizationSettings(StrictModel):
    """bitsandbytes loading of the base model."""

    load_in_4bit: bool = Field(default=True, description="Quantize the base to 4 bits (QLoRA).")
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(default=True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Matmul dtype; auto = bfloat16 on a GPU, float32 on a CPU."
    )


class TrainingSettings(StrictModel):
    """Optimisation settings of one fine-tuning job (the study's defaults)."""

    max_steps: int = Field(default=40000, gt=0, description="Optimizer steps.")
    micro_batch_size: int = Field(default=1, gt=0, description="Sequences (or packed rows) per forward pass.")
    gradient_accumulation_steps: int = Field(default=16, gt=0, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="Decay after warm-up.")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of steps of linear warm-up.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_seq_length: int = Field(default=1200, gt=8, description="Examples are cut to this many tokens.")
    packing: bool = Field(default=True, description="Pack short examples padding-free into one row.")
    gradient_checkpointing: bool = Field(default=True, description="Recompute activations in backward.")
    optimizer: Literal["auto", "adamw", "paged_adamw_32bit", "paged_adamw_8bit"] = Field(
        default="auto", description="auto = paged_adamw_32bit on a GPU, adamw on a CPU."
    )
    checkpoint_every: int = Field(default=1000, gt=0, description="Save a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(default=2, gt=0, description="Checkpoints kept on the storage path.")
    log_every: int = Field(default=10, gt=0, description="Report step metrics every N steps.")
    min_micro_batch_size: int = Field(default=1, gt=0, description="Out-of-memory back-off floor for the micro-batch; packed, "
                                      "passes then shrink further, down to one example each.")
    max_train_examples: int | None = Field(default=None, gt=0, description="Use at most this many training rows.")
    seed: int = Field(default=42, description="Seed for initialisation, data order and dropout.")


class EvalSettings(StrictModel):
    """Evaluation settings (the study's)."""

    limit: int | None = Field(default=None, gt=0, description="Override every task's eval_limit (e.g. for smoke runs).")
    max_new_tokens: int | None = Field(default=None, gt=0, description="Override every task's max_new_tokens.")
    prompt_max_chars: int = Field(default=1500, gt=0, description="Prompts are cut to this many characters (code prompts never: a program's head is kept whole).")
    batch_size: int = Field(default=8, gt=0, description="Prompts generated per batch.")
    code_timeout_s: float = Field(default=10.0, gt=0, description="Time limit per HumanEval program.")
    code_memory_mb: int = Field(default=1024, gt=0, description="Memory limit per HumanEval program.")


class JobConfig(StrictModel):
    """Everything one worker job needs: `python -m jobs.train --config FILE` reads this."""

    kind: Literal["train", "evaluate_base"] = Field(default="train", description="Fine-tune, or score the base zero-shot.")
    job_key: str = Field(default="", description="Stable key (sweep, base, task, config hash); empty when run alone.")
    base_model: BaseModelSpec = Field(description="The base model: a catalogue name, or its whole entry.")
    task: TaskSpec = Field(description="The task: a catalogue name, or its whole entry.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings.")
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings, description="Quantization.")
    training: TrainingSettings = Field(default_factory=TrainingSettings, description="Optimisation.")
    evaluation: EvalSettings = Field(default_factory=EvalSettings, description="Evaluation.")
    output_dir: str = Field(description="Storage path for checkpoints, the adapter and results.")
    device: Literal["auto", "cuda", "cpu"] = Field(default="auto", description="auto = cuda if available.")

    @field_validator("base_model", "task", mode="before")
    @classmethod
    def _from_catalogue(cls, value: Any, info: Any) -> Any:
        """A name is looked up in the catalogue (`loraland catalog --all`)."""
        if not isinstance(value, str):
            return value
        from jobs.catalog import load_catalog

        catalog = load_catalog()
        try:
            return catalog.base_model(value) if info.field_name == "base_model" else catalog.task(value)
        except KeyError as exc:
            raise ValueError(str(exc.args[0]).split(";")[0] + "; see `loraland catalog --all`") from None


# --------------------------------------------------------------------------- loading and errors


class ConfigError(ValueError):
    """A user's config is wrong; `problems` holds one line per problem, each naming the field."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def format_validation_error(error: ValidationError) -> list[str]:
    """One line per pydantic error: `field.path: message (got value)`."""
    lines = []
    for item in error.errors():
        loc = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"]).lstrip(".") or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (remove it or check its spelling)"
        got = item.get("input")
        shown = "" if item["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{loc}: {message}{shown}")
    return lines


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one of our YAML files, which all hold a mapping of keys; a missing or unreadable file, bytes
    that are not UTF-8, a syntax error, an empty file or another top-level value is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["not a file" if path.exists() else "file not found"])
    try:
        raw = path.read_bytes()
        data = yaml.safe_load(raw.decode("utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file ({exc.strerror or exc})"]) from None
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(str(path), [f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}, line {line}); "
                                      "save the file as UTF-8"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(str(path), [f"{where}not valid YAML ({problem})"]) from None
    if data is None:
        raise ConfigError(str(path), ["the file is empty (or only comments); expected a mapping of keys"])
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"expected a mapping of keys at the top level, got a {type(data).__name__}"])
    return data


def parse_model(model: type[StrictModel], data: Any, source: str) -> Any:
    """Validate `data` as `model`, raising ConfigError with one line per problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, format_validation_error(exc)) from None


def lora_target_problems(targets: Any, base_models: list[BaseModelSpec], field: str = "lora.target_modules") -> list[str]:
    """A line per listed LoRA target module that is not a linear layer of the base models (`all-linear`
    fits any); base models with the same layers share a line. `targets` may be raw data: a value of the
    wrong type is left to validation."""
    if not isinstance(targets, list):
        return []
    if not targets:
        return [f"{field}: lists no module; name some, or write `all-linear`"]
    problems = []
    for index, name in enumerate(targets):
        if name == "all-linear":
            problems.append(f"{field}[{index}]: write `target_modules: all-linear` on its own, not inside a list")
            continue
        missing: dict[tuple[str, ...], list[str]] = {}
        for base in base_models:
            if isinstance(name, str) and name not in base.all_linear_modules:
                missing.setdefault(tuple(base.all_linear_modules), []).append(base.name)
        problems += [f"{field}[{index}]: {name!r} is not a linear layer of {', '.join(names)} (has {', '.join(layers)})"
                     for layers, names in missing.items()]
    return problems


def parse_job_config(data: Any, source: str) -> JobConfig:
    """Validate a job config mapping, LoRA target modules against its base model included."""
    config: JobConfig = parse_model(JobConfig, data, source)
    problems = lora_target_problems(config.lora.target_modules, [config.base_model])
    if problems:
        raise ConfigError(source, problems)
    return config


def load_job_config(path: str | Path) -> JobConfig:
    """Load and validate a job config file."""
    return parse_job_config(read_yaml(path), str(path))


def outcome_settings(config: Any, kind: str) -> dict[str, Any]:
    """The settings of a job (or a sweep's, for its jobs of `kind`) that change its outcome, by section: quantization and
    evaluation, plus LoRA and training for a fine-tune. The job key's hash and an output folder's record both use it."""
    sections = ["quantization", "evaluation"] + (["lora", "training"] if kind == "train" else [])
    return {section: getattr(config, section).model_dump(mode="json") for section in sections}


def dump_yaml(model: BaseModel, path: str | Path) -> None:
    """Write a config as YAML that `load_*` reads back identically."""
    Path(path).write_text(yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False))


def data_home() -> Path:
    """Where the embedded default keeps its state (tiny models, MLflow's SQLite file, runs):
    `$LORALAND_HOME`, else `.loraland/` in the project."""
    return Path(os.environ.get("LORALAND_HOME") or PROJECT_ROOT / ".loraland")
