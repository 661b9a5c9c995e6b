"""The schemas of what a user writes for a worker: base models and tasks (catalogue entries) and the settings of a job.

Pure pydantic models: no file is read here (the catalogue is `core/catalog.py`, a job's config `jobs/config.py`).
Every model rejects unknown keys and describes each field, so `loraland validate` can name the field at fault.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from core.families import family


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, types are strict (`true` is not a rank, "100" is not a step
    count; an integer is a float), numbers are finite, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)


def names_or(keyword: str) -> Any:
    """A `mode="before"` validator for a `list[str] | Literal[keyword]` field: a lone string other than `keyword` gets
    one clear error instead of one per member of the union."""

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


# What each family and chat format means is core/families/ (FAMILIES, CHAT_FORMATS; a test keeps the two in step).
ChatFormat = Literal["llama2", "mistral", "zephyr", "gemma", "phi", "plain"]
Family = Literal["llama", "mistral", "gemma", "phi"]


class BaseModelSpec(StrictModel):
    """One base model of the catalogue."""

    name: str = Field(description="Short name used in sweeps, model ids and MLflow tags.")
    hf_id: str = Field(description="Hugging Face id, or `tiny/<name>` for a locally built tiny model.")
    family: Family = Field(description="Architecture family (core/families/): its linear layers, transformers "
                           "config class and memory shape.")
    params_billion: float = Field(gt=0, description="Parameter count in billions.")
    instruction_tuned: bool = Field(description="Whether the published checkpoint is instruction-tuned.")
    chat_format: ChatFormat = Field(description="Chat convention used by /v1/chat/completions.")
    all_linear_modules: list[str] = Field(
        default_factory=list, validate_default=True,
        description="Names of every linear projection in a block (LoRA `all-linear`); default: the family's.",
    )
    architecture: Architecture = Field(description="Shape numbers for memory estimates.")
    tiny: bool = Field(default=False, description="A tiny offline counterpart built from config, not downloaded.")
    gated: bool = Field(default=False, description="The Hub serves the weights only to accounts that accepted the "
                        "model's terms: workers need `HF_TOKEN` of such an account.")

    @field_validator("all_linear_modules")
    @classmethod
    def _family_layers(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """Empty: the family's linear layers; listed: exactly those (in any order)."""
        if "family" not in info.data:  # the family itself is invalid: that is the error to show
            return value
        layers = family(info.data["family"]).linear_modules
        if not value:
            return layers
        if sorted(value) != sorted(layers):
            raise ValueError(f"{value} are not the linear layers of family {info.data['family']} "
                             f"({', '.join(layers)}); leave the field out to use them")
        return value


# --------------------------------------------------------------------------- tasks

Category = Literal["classic_nlp", "coding", "knowledge", "reasoning", "math", "demo"]
Metric = Literal["accuracy", "rouge", "stsb_similarity", "humaneval"]
AnswerKind = Literal["exact", "boolean", "choice", "last_number", "number", "text", "code"]
StudyMetric = Literal["binary_accuracy_flex", "mnli_accuracy", "mrpc_accuracy", "hellaswag_accuracy",
                      "customer_support_accuracy", "mmlu_accuracy", "rouge", "stsb", "dbpedia", "gsm8k_regex"]
Scoring = Literal["study", "strict"]
PromptCut = Literal["study", "keep_cue"]


class DatasetSource(StrictModel):
    """Where a task's examples come from."""

    kind: Literal["hf", "kaggle", "github", "local", "demo"] = Field(
        description="hf: `datasets.load_dataset`; kaggle/github: files on disk written from that download by "
        "`loraland data prepare`; local: files on disk; demo: generated offline."
    )
    id: str = Field(description="HF dataset id, Kaggle slug, GitHub repository, local folder, or demo generator name.")
    config: str | None = Field(default=None, description="HF config name; `A+B` concatenates two configs.")
    revision: str | None = Field(default=None, description="HF revision: a commit SHA (pinned), `main` (a maintained "
                                 "parquet repository, to pin) or `refs/convert/parquet` (the Hub's parquet conversion "
                                 "of a script dataset); the catalogue's Hub sources all set one (docs/data.md).")
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
    prompt: str = Field(description="Jinja template: row -> prompt (completion-style; zero-shot unless "
                        "`worked_examples`).")
    completion: str = Field(description="Jinja template: row -> gold completion (the training target).")
    worked_examples: int = Field(
        default=0, ge=0, description="Worked examples the prompt shows (the study's examples_in_prompt): the first N "
        "rows of the training split, in the dataset's order, read with the data (jobs/data.py) and given to the prompt "
        "templates as `examples`, each row's columns plus its rendered `completion` (core/prompts.py).")
    metric: Metric = Field(description="The study's metric for this task.")
    answer: AnswerKind = Field(description="How a generated answer is parsed before scoring.")
    labels: list[str] | None = Field(default=None, description="Allowed answers for classification tasks.")
    study_metric: StudyMetric | None = Field(
        default=None, description="The study's own scoring rule for this task (jobs/study_metrics.py), used under "
        "`evaluation.scoring: study`; unset (demo tasks, and study tasks whose rule the study's code lacks) = strict "
        "scoring.")
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
    min_micro_batch_size: int = Field(default=1, gt=0, description="Out-of-memory back-off floor for the "
                                      "micro-batch; packed, passes then shrink further, down to one example each.")
    max_train_examples: int | None = Field(default=None, gt=0, description="Use at most this many training rows.")
    seed: int = Field(default=42, description="Seed for initialisation, data order and dropout.")


EvalPath = Literal["evaluator", "generate"]


class EvaluatorSettings(StrictModel):
    """The multi-LoRA engine that evaluations go through under `evaluation.engine: evaluator` (one per base model,
    rows of many adapters decoded in the same batches); serving/evaluation.py maps these onto the batching engine's
    config by name (serving.config.BatchingEngineConfig: each field here is one there, `max_queued_rows` its
    `max_queued_requests`). They change speed and memory, never a completion, so they are not part of a job's
    identity."""

    max_batch_size: int = Field(default=256, gt=0, description="Rows decoded together in one forward pass, across "
                                "every evaluation on the engine (their KV caches are held at once).")
    max_batch_tokens: int = Field(default=65_536, gt=0, description="Budget of the batch's padded KV cache in tokens "
                                  "(rows x the longest row's prompt + new tokens): rows join only within it, e.g. "
                                  "about 220 rows of short prompts and 256 new tokens, 100 of 1,500-character prompts "
                                  "(a 7B's KV cache takes 0.1-0.5 MB a token: raise it where the accelerator has "
                                  "room).")
    max_queued_rows: int = Field(default=100_000, gt=0, description="Rows waiting for a batch place (every row of "
                                 "every evaluation is submitted at once).")
    device_adapter_slots: int = Field(default=0, ge=0, description="Adapters on the accelerator at once; 0: sized "
                                      "from free memory.")
    host_adapter_slots: int = Field(default=64, gt=0, description="Adapters kept in host memory (LRU beyond).")
    max_lora_rank: int = Field(default=64, gt=0, description="Largest adapter rank the engine accepts (its slots are "
                               "sized by it).")


# EvalSettings fields that choose how completions are generated, not what they are: left out of a job's identity
# (jobs/config.py outcome_settings), so switching the path re-uses finished jobs, and out of its logged params.
EVAL_PATH_FIELDS = ("engine", "evaluator")
# Left out of a job's identity too: where code runs changes no score's meaning for a finished job; the report marks
# scores made with unconfined code from the run's logged `evaluation.unconfined_code`.
EVAL_NOT_OUTCOME_FIELDS = (*EVAL_PATH_FIELDS, "unconfined_code")


class EvalSettings(StrictModel):
    """Evaluation settings (the study's)."""

    limit: int | None = Field(default=None, gt=0, description="Override every task's eval_limit (e.g. for smoke runs).")
    max_new_tokens: int | None = Field(default=None, gt=0, description="Override every task's max_new_tokens.")
    prompt_max_chars: int = Field(default=1500, gt=0, description="Prompts are cut to this many characters (code "
                                  "prompts never: a program's head is kept whole).")
    prompt_cut: PromptCut = Field(
        default="study", description="How long prompts are cut to `prompt_max_chars`. `study`, the study's setup: "
        "evaluation keeps a prompt's first characters (a long input loses the fields after it and the answer cue) and "
        "training cuts nothing (only `training.max_seq_length` tokens, as the study's training config did). "
        "`keep_cue`, ours, for both: the input before the final cue line is shortened so the instruction head and the "
        "cue survive.")
    scoring: Scoring = Field(
        default="study", description="`study`: tasks with a `study_metric` are scored by the study's looser rules "
        "(labels found anywhere, failed generations left out of the mean and counted); other tasks (the demo tasks) "
        "strictly. `strict`: every task by its `metric`/`answer` parsing (jobs/metrics.py).")
    batch_size: int = Field(default=8, gt=0, description="Prompts generated per batch.")
    code_timeout_s: float = Field(default=10.0, gt=0, description="Time limit per HumanEval program.")
    code_memory_mb: int = Field(default=1024, gt=0, description="Memory limit per HumanEval program.")
    unconfined_code: bool = Field(
        default=False, description="Allow code tasks to run model-written programs without the kernel's confinement "
        "(bubblewrap) where this machine cannot give it (bwrap missing, user namespaces off): they then run with "
        "resource limits alone, as the evaluator's user, with its network. Off, such a machine refuses code tasks "
        "before training. Runs that allow it are marked in the report.")
    engine: EvalPath = Field(
        default="evaluator", description="How completions are generated (greedy, the same text either way): "
        "`evaluator`, the sweep's evaluations of one base model share one multi-LoRA engine (serving/evaluation.py; "
        "continuous batching across adapters); `generate`, each job alone with transformers' generate "
        "(jobs/evaluate.py; also what a job run without the driver uses).")
    evaluator: EvaluatorSettings = Field(default_factory=EvaluatorSettings,
                                         description="The evaluator's engine, under `engine: evaluator`.")
