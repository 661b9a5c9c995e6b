"""A worker job's config (`python -m jobs train --config FILE`): what it runs on, with which settings, where.

Catalogue names in a job config stand for whole entries; they are resolved in the catalogue passed as validation
context, else the shipped one. The schemas of catalogue entries and settings are `core/schemas.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from core.catalog import Catalog, load_catalog
from core.errors import ConfigError
from core.parsing import parse_model, read_yaml
from core.schemas import (
    EVAL_NOT_OUTCOME_FIELDS,
    BaseModelSpec,
    EvalSettings,
    LoraSettings,
    QuantizationSettings,
    StrictModel,
    TaskSpec,
    TrainingSettings,
)

JobKind = Literal["train", "evaluate_base"]


class JobConfig(StrictModel):
    """Everything one worker job needs: `python -m jobs train --config FILE` reads this."""

    kind: JobKind = Field(default="train", description="Fine-tune, or score the base zero-shot.")
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
    def _from_catalogue(cls, value: Any, info: ValidationInfo) -> Any:
        """A name is looked up in the catalogue: the one passed as validation context `{"catalog": ...}`, else the
        shipped one (`loraland catalog --all`)."""
        if not isinstance(value, str):
            return value
        catalog: Catalog | None = (info.context or {}).get("catalog")
        if catalog is None:
            catalog = load_catalog()
        entries: Mapping[str, Any] = catalog.base_models if info.field_name == "base_model" else catalog.tasks
        if value not in entries:
            what = str(info.field_name).replace("_", " ")
            raise ValueError(f"unknown {what} {value!r}; see `loraland catalog --all`")
        return entries[value]


def lora_target_problems(targets: Any, base_models: list[BaseModelSpec],
                         field: str = "lora.target_modules") -> list[str]:
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


def parse_job_config(data: Any, source: str, catalog: Catalog | None = None) -> JobConfig:
    """Validate a job config mapping (names resolved in `catalog`, default the shipped one), LoRA target modules
    against its base model included; every problem is a line of one ConfigError."""
    config = parse_model(JobConfig, data, source, context={"catalog": catalog} if catalog else None)
    problems = lora_target_problems(config.lora.target_modules, [config.base_model])
    if problems:
        raise ConfigError(source, problems)
    return config


def load_job_config(path: str | Path, catalog: Catalog | None = None) -> JobConfig:
    """Load and validate a job config file."""
    return parse_job_config(read_yaml(path), str(path), catalog)


def outcome_settings(config: Any, kind: str) -> dict[str, Any]:
    """The settings of a job (or a sweep's, for its jobs of `kind`) that change its outcome, by section: quantization
    and evaluation, plus LoRA and training for a fine-tune. The job key's hash and an output folder's record both use
    it. The evaluation path (evaluator or generate) and `unconfined_code` are left out (`EVAL_NOT_OUTCOME_FIELDS`): both
    paths give the same completions."""
    sections = ["quantization", "evaluation"] + (["lora", "training"] if kind == "train" else [])
    return {section: getattr(config, section).model_dump(mode="json", exclude=set(EVAL_NOT_OUTCOME_FIELDS)
                                                         if section == "evaluation" else None)
            for section in sections}
