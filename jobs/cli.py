"""The job command lines, run without Ray: `python -m jobs train --config FILE` (train, evaluate, write result.json)
and `python -m jobs evaluate --config FILE [--adapter DIR]` (score the base, or an adapter, on the job's task).

A user's mistake (core.errors.UserError) is one line per problem on stderr and exit status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
from typing import Literal

from core.errors import UserError, print_user_error
from jobs.config import JobConfig, load_job_config
from jobs.evaluate import evaluate_model
from jobs.models import check_adapter_dir, load_adapter, load_base_model, load_tokenizer, resolve_device
from jobs.run import run_job
from jobs.storage import join

Mode = Literal["train", "evaluate"]


def build_parser(mode: Mode) -> argparse.ArgumentParser:
    """The arguments of `python -m jobs <mode>`."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs {mode}", description=f"{mode} one job without Ray")
    parser.add_argument("--config", required=True, help="job config YAML (see jobs/config.py: JobConfig)")
    if mode == "evaluate":
        parser.add_argument("--adapter", help="adapter folder to evaluate instead of the base model")
    return parser


def main(mode: Mode, argv: list[str] | None = None) -> int:
    """Run `python -m jobs <mode>` with `argv` (default: the process's arguments); the exit status."""
    args = build_parser(mode).parse_args(argv)
    try:
        config = load_job_config(args.config)
        if mode == "evaluate":
            print(json.dumps(evaluate_job(config, args.adapter)))
        else:
            print(json.dumps(train_job(config)))
    except UserError as error:
        return print_user_error(error)
    return 0


def train_job(config: JobConfig) -> dict[str, object]:
    """Fine-tune and evaluate the job (printing step metrics as they come); its score and training summary."""
    result = run_job(config.model_copy(update={"kind": "train"}),
                     on_step=lambda step, m: print(f"step {step}: {m}", flush=True))
    return {"score": result.score, "metric": result.metric, "adapter_dir": result.adapter_dir, **result.summary}


def evaluate_job(config: JobConfig, adapter: str | None) -> dict[str, object]:
    """Score the base model zero-shot (as its own job, in a folder beside the fine-tune's), or the adapter in `adapter`
    on the job's base model."""
    if adapter is None:
        result = run_job(config.model_copy(update={"kind": "evaluate_base",
                                                   "output_dir": join(config.output_dir, "evaluate_base")}))
        return {"score": result.score, "metric": result.metric, "examples": result.examples}
    check_adapter_dir(adapter)  # before the base is loaded
    model = load_adapter(load_base_model(config.base_model, config.quantization, resolve_device(config.device)),
                         adapter)
    evaluation = evaluate_model(model, load_tokenizer(config.base_model), config.task, config.evaluation)
    return {"score": evaluation.score, "metric": evaluation.metric, "examples": evaluation.examples}
