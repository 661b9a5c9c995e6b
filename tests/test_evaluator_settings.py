"""The evaluator's settings (core.schemas.EvaluatorSettings) reach the batching engine it builds, field by field."""

from __future__ import annotations

import pytest

from core.schemas import EvalSettings, EvaluatorSettings
from serving.evaluation import ENGINE_FIELD_NAMES, evaluator_engine_config

pytestmark = pytest.mark.unit


def test_every_evaluator_setting_reaches_the_engine_config() -> None:
    changed = {name: (field.default or 1) + 7 for name, field in EvaluatorSettings.model_fields.items()}
    config = evaluator_engine_config(EvalSettings(evaluator=EvaluatorSettings(**changed)))
    for name, value in changed.items():
        assert getattr(config, ENGINE_FIELD_NAMES.get(name, name)) == value, name
    assert config.max_batch_tokens == changed["max_batch_tokens"]  # a 7B's long rows are not capped at 32k tokens
