"""Where the project's files live: the checkout, its shipped configs, and the data folder of the embedded default."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"
# An adapter folder in PEFT's format: the LoRA weights (safetensors) and the config naming the base and the targets.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def data_home() -> Path:
    """Where the embedded default keeps its state (tiny models, MLflow's SQLite file, runs):
    `$LORALAND_HOME`, else `.loraland/` in the project."""
    return Path(os.environ.get("LORALAND_HOME") or PROJECT_ROOT / ".loraland")
