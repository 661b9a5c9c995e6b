"""LoRA search: co-trained trials against one trial per process, and ASHA against running every trial to the end.

Part (a), `cotrained`: K = 8 trials of one search (different ranks, alphas, learning rates and target modules, the
study's micro-batch 1, one example per forward pass) trained, scored on the validation rows every `--eval-every`
steps and saved as a search trains them: all 8 in one `jobs.trials.TrialHost` (one process, the base loaded once, one
thread per trial as the search's host actor runs them), against one trial per process (a fresh process per trial, the
base loaded each time, `TrialHost(slots=1)`), one after another. Each process has one torch thread (a Ray worker with
`num_cpus=1`). Trials per hour = trials / wall time from process start to exit (imports and loading included, as a
fresh process pays them); the JSON also has the ratio without the processes' start-up (imports), from the moment each
process starts loading the base. `cotrained_trials_speedup` = co-trained trials per hour / one-per-process ones.
`cotrained_trials_per_group_step` is the trial steps each shared step of the host ran (K when the trials step
together, as they should: a trial between calls is waited for, `jobs.trials`).

Part (b), `asha`: one search of 16 trials through the sweep's own search (`orchestrator.search_trials.search_once`:
Ray Tune on a local Ray on 127.0.0.1, the trials co-trained K = 8 at a time in the search's trial host actor, each
trial an MLflow run in an `mlflow server` on SQLite), drawn with one seed from rank x learning rate x target modules
(so both runs train the same 16 trials), scored every `--asha-eval-every` steps, once with ASHA (grace period
`--grace-period`, reduction factor `--reduction-factor`) and once with every trial run to the end. Each run starts its
own host (the base loaded in each). `asha_time_ratio` = ASHA's wall time / the full run's;
`asha_best_gap` = the full run's best score - ASHA's (the best over trials of a trial's last score, which is what
the search publishes: the adapter saved last is the one scored). Beside them, `theory`: what ASHA could save with these
settings and no fixed cost (`asha_theory`: its share of the full run's trial steps, the time ratio when a step costs
in proportion to the trials in it, and of its shared steps, when a step costs the same however many it holds; a step of
4 examples a trial of this tiny model took 14 ms with 1 trial, 63 ms with 8), and each run's
`trial_steps_per_group_step`.

Part (b)'s settings, and why: each step is the study's effective batch (16 examples: micro-batch 4, 4 accumulated;
the study's was 1 x 16), trials are 288 steps (4,608 examples; the trials that learn `demo_sentiment` at all reach
their plateau well before), scored every 8 steps on 32 held-out rows. A search has one-off costs that do not depend on
its trials' length (Ray Tune's start, K trial processes importing Tune and MLflow, the host importing torch and loading
the base: 45 s on this 2-core machine at load average 7, before the first report), paid alike by both runs, so short
trials measure mostly those (at 48 steps the ratio was about 1); real searches train minutes to hours per trial. ASHA:
grace period 24, reduction factor 3, so rungs at 24, 72 and 216 steps. An earlier first rung stops the trials that
win: with grace 6 (run at 288 steps), every all-linear trial, the only kind that learns the task, was stopped at step 6
or 18, where slow starters score 0 and the fast-falling loss of q/v trials at learning rate 1e-2 ranks them above,
and ASHA's best was 0.03 against the full run's 0.56; by step 24 the all-linear trials at 3e-3 and above score.

    python -m benchmarks.search [--parts cotrained asha] [--task demo_sentiment] [--quick] [--out FILE]

Writes JSON (default benchmarks/results/search.json) with the three figures at the top level, `results`, `settings`,
`machine` and `command`.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, child_env, collect, command, emit, machine, spawn, write_report

DEFAULT_OUT = RESULTS / "search.json"
PARTS = ("cotrained", "asha")
K = 8
# The grid the trials are drawn from, in order: rank (alpha 2r), learning rate, target modules.
RANKS = (4, 16)
RATES = (3e-4, 1e-3, 3e-3, 1e-2)
TARGETS: tuple[Any, ...] = ("all-linear", ["q_proj", "v_proj"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Co-trained trials vs one per process; ASHA vs every trial run to "
                                     "the end.")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="(default: %(default)s)")
    parser.add_argument("--task", default="demo_sentiment", help="the searched demo task (default: %(default)s)")
    parser.add_argument("--base", default="tiny-llama", help="tiny base model (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=16, help="(a) steps per trial (default: %(default)s)")
    parser.add_argument("--accumulation", type=int, default=8,
                        help="(a) examples per step at micro-batch 1 (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=8, help="(a) steps between scores (default: %(default)s)")
    parser.add_argument("--validation-rows", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--asha-steps", type=int, default=288, help="(b) steps per trial (default: %(default)s)")
    parser.add_argument("--asha-accumulation", type=int, default=4,
                        help="(b) micro-batches of 4 examples a step (default: %(default)s: the study's 16 examples a "
                        "step)")
    parser.add_argument("--asha-eval-every", type=int, default=8,
                        help="(b) steps between scores (default: %(default)s)")
    parser.add_argument("--grace-period", type=int, default=24, help="(b) ASHA (default: %(default)s)")
    parser.add_argument("--reduction-factor", type=float, default=3.0, help="(b) ASHA (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps and rows")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default: %(default)s)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "INDEX", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.accumulation, args.eval_every, args.validation_rows = 2, 2, 1, 8
        args.asha_steps, args.asha_eval_every, args.grace_period, args.asha_accumulation = 4, 1, 1, 1
    return args


# --------------------------------------------------------------------------- the trials


def grid(index: int) -> dict[str, Any]:
    """Trial `index`'s draws from the grid (16 distinct settings)."""
    rank, rest = RANKS[index % len(RANKS)], index // len(RANKS)
    rate, targets = RATES[rest % len(RATES)], TARGETS[(rest // len(RATES)) % len(TARGETS)]
    return {"r": rank, "alpha": 2 * rank, "learning_rate": rate, "target_modules": targets}


def trial_job(args: argparse.Namespace, index: int, root: Path, micro_batch: int, accumulation: int,
              steps: int, eval_every: int) -> Any:
    """Trial `index` of the search as the host trains it (its own seed and output folder)."""
    from core.catalog import load_catalog
    from core.schemas import EvalSettings, LoraSettings, TrainingSettings
    from jobs.config import JobConfig

    catalog, draws = load_catalog(), grid(index)
    return JobConfig(
        base_model=catalog.base_model(args.base), task=catalog.task(args.task), output_dir=str(root / f"t{index}"),
        device="cpu", job_key=f"search/t{index}",
        lora=LoraSettings(r=draws["r"], alpha=draws["alpha"], dropout=0.0, target_modules=draws["target_modules"]),
        evaluation=EvalSettings(batch_size=args.validation_rows),
        training=TrainingSettings(max_steps=steps, micro_batch_size=micro_batch,
                                  gradient_accumulation_steps=accumulation, learning_rate=draws["learning_rate"],
                                  packing=micro_batch > 1, gradient_checkpointing=False,
                                  checkpoint_every=eval_every, log_every=eval_every, seed=index))


def study_trial(args: argparse.Namespace, index: int, root: Path) -> Any:
    """Part (a)'s trial: the study's micro-batch 1 (unpacked), `--accumulation` examples a step."""
    return trial_job(args, index, root, 1, args.accumulation, args.steps, args.eval_every)


def run_trial(host: Any, trial_id: str, job: Any, eval_every: int) -> list[float]:
    """A trial as a search runs it: `eval_every` steps at a time, scored and saved after each; dropped at the end.
    Returns its scores."""
    scores, step = [], 0
    while step < job.training.max_steps:
        step = min(step + eval_every, job.training.max_steps)
        host.train(trial_id, job, step)
        scores.append(host.validate(trial_id))
        host.save(trial_id)
    host.drop(trial_id)
    return scores


# --------------------------------------------------------------------------- (a) co-trained vs one per process


def run_child(args: argparse.Namespace) -> None:
    """One measuring process: `co` runs the K trials in one host, one thread each; `alone` runs trial INDEX alone."""
    import torch

    torch.set_num_threads(1)
    mode, index, folder = args.child[0], int(args.child[1]), Path(args.child[2])
    loading = time.time()
    from core.catalog import load_catalog
    from core.schemas import QuantizationSettings
    from jobs.trials import TrialHost

    host = TrialHost(load_catalog().base_model(args.base), QuantizationSettings(), "cpu", K if mode == "co" else 1,
                     validation_size=args.validation_rows)
    indices = list(range(K)) if mode == "co" else [index]
    scores: dict[int, list[float]] = {}

    def one(i: int) -> None:
        scores[i] = run_trial(host, f"t{i}", study_trial(args, i, folder), args.eval_every)

    threads = [threading.Thread(target=one, args=(i,)) for i in indices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    emit({"loading_started": loading, "end": time.time(), "scores": scores, "group_steps": host.group_steps,
          "trial_steps": host.trial_steps})


def timed_child(args: argparse.Namespace, mode: str, index: int, folder: Path) -> dict[str, Any]:
    """Run one measuring process; its result with `started` (just before the process was spawned)."""
    arguments = ["--child", mode, str(index), str(folder), "--task", args.task, "--base", args.base,
                 "--steps", str(args.steps), "--accumulation", str(args.accumulation),
                 "--eval-every", str(args.eval_every), "--validation-rows", str(args.validation_rows)]
    started = time.time()
    process: subprocess.Popen[str] = spawn("search", arguments, child_env(threads=1))
    return collect(process, f"search: the {mode} process", timeout_s=3600) | {"started": started}


def cotrained_part(args: argparse.Namespace) -> dict[str, Any]:
    """K trials in one host against one trial per process, one after another."""
    with tempfile.TemporaryDirectory() as tmp:
        co = timed_child(args, "co", 0, Path(tmp) / "co")
        alone = [timed_child(args, "alone", i, Path(tmp) / "alone") for i in range(K)]
    co_wall, co_running = co["end"] - co["started"], co["end"] - co["loading_started"]
    alone_wall = sum(run["end"] - run["started"] for run in alone)
    alone_running = sum(run["end"] - run["loading_started"] for run in alone)
    row = {
        "trials": K, "cotrained_wall_s": co_wall, "one_per_process_wall_s": alone_wall,
        "cotrained_trials_per_hour": K * 3600 / co_wall, "one_per_process_trials_per_hour": K * 3600 / alone_wall,
        "cotrained_running_s": co_running, "one_per_process_running_s": alone_running,
        "speedup_without_startup": alone_running / co_running, "cotrained_group_steps": co["group_steps"],
        "cotrained_trials_per_group_step": co["trial_steps"] / max(co["group_steps"], 1),
        "one_per_process_steps": K * args.steps,
        "same_scores": all(co["scores"][str(i)] == alone[i]["scores"][str(i)] for i in range(K)),
        "cotrained_scores": {int(i): s for i, s in co["scores"].items()},
        "one_per_process_scores": {i: run["scores"][str(i)] for i, run in enumerate(alone)},
    }
    row["speedup"] = alone_wall / co_wall
    return row


# --------------------------------------------------------------------------- (b) ASHA vs every trial to the end


def search_sweep(args: argparse.Namespace, scheduler: str, root: Path) -> Any:
    """The benchmark's search as a sweep: one base and task, `2K` trials drawn (seeded: the same in both runs) from
    the grid's dimensions, K at a time, scored every `--asha-eval-every` steps; ASHA or every trial to the end."""
    from orchestrator.config import SweepConfig

    return SweepConfig.model_validate({
        "name": f"search-bench-{scheduler}", "base_models": [args.base], "tasks": [args.task], "evaluate_base": False,
        "lora": {"dropout": 0.0}, "storage_path": str(root),
        "training": {"max_steps": args.asha_steps, "micro_batch_size": 4,
                     "gradient_accumulation_steps": args.asha_accumulation,
                     "max_seq_length": 128, "log_every": args.asha_eval_every, "gradient_checkpointing": False},
        "evaluation": {"limit": args.validation_rows, "batch_size": args.validation_rows},
        "search": {"space": {"r": list(RANKS), "learning_rate": list(RATES), "target_modules": list(TARGETS)},
                   "num_samples": 2 * K, "validation_rows": args.validation_rows, "eval_every": args.asha_eval_every,
                   "scheduler": scheduler, "max_concurrent_trials": K,
                   "asha": {"grace_period": args.grace_period, "reduction_factor": args.reduction_factor}},
        "resources": {"device": "cpu", "cpus_per_job": 1, "co_train": K}})


def asha_run(args: argparse.Namespace, scheduler: str, root: Path, uri: str) -> dict[str, Any]:
    """One search (`orchestrator.search_trials.search_once`: Ray Tune, the trials co-trained K at a time in a fresh
    host, each a run in MLflow) and its figures."""
    from orchestrator.search_trials import search_once

    outcome = search_once(search_sweep(args, scheduler, root), args.base, args.task, uri)
    failed = [trial for trial in outcome["trials"] if trial["error"]]
    if failed:
        raise RuntimeError(f"search: {len(failed)} trial(s) failed, e.g. {failed[0]['error']}")
    trials = outcome["trials"]
    return {"wall_s": outcome["wall_s"], "trials": trials, "trial_steps": sum(int(t["step"]) for t in trials),
            "best_last_score": float(outcome["best"]["score"]), "group_steps": outcome["group_steps"],
            "trial_steps_per_group_step": outcome["trial_steps"] / max(outcome["group_steps"], 1)}


def asha_part(args: argparse.Namespace) -> dict[str, Any]:
    """Every trial to the end, then ASHA, on one local Ray and one `mlflow server` (SQLite), both on loopback."""
    import ray

    from core.ports import free_port
    from tracking.server import server_command, start_server, stop_server

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_server(server_command(f"sqlite:///{tmp}/mlflow.db", "127.0.0.1", port,
                                             artifacts_destination=f"{tmp}/artifacts"),
                              f"http://127.0.0.1:{port}", Path(tmp) / "mlflow.log")
        start_loopback_ray()
        try:
            full = asha_run(args, "none", Path(tmp) / "full", f"http://127.0.0.1:{port}")
            asha = asha_run(args, "asha", Path(tmp) / "asha", f"http://127.0.0.1:{port}")
        finally:
            ray.shutdown()
            stop_server(server)
    return {"asha": asha, "full": full, "time_ratio": asha["wall_s"] / full["wall_s"],
            "best_gap": full["best_last_score"] - asha["best_last_score"],
            "trial_steps_ratio": asha["trial_steps"] / full["trial_steps"],
            "group_steps_ratio": asha["group_steps"] / full["group_steps"],
            "theory": asha_theory(2 * K, K, args.asha_steps, args.asha_eval_every, args.grace_period,
                                  args.reduction_factor)}


def start_loopback_ray() -> None:
    """A local Ray on 127.0.0.1 whose workers run one torch thread. Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it
    is imported (at 1, Linux's default, it swaps 127.0.0.1 for the machine's outward address): its constant is set too,
    as orchestrator.cluster.start_local_ray does."""
    import os

    import ray
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})


def asha_theory(trials: int, slots: int, steps: int, eval_every: int, grace: int, factor: float,
                draws: int = 400) -> dict[str, float]:
    """What ASHA saves at best with these settings, all fixed costs left out: Tune's ASHA rule (at its first report at
    or past a rung, a trial goes on unless its score is below the 1 - 1/factor quantile of the scores recorded at that
    rung before it) simulated over `trials` trials, `slots` at a time in lockstep (a freed slot taken by the next trial
    at the next step), with scores that rank the trials the same at every rung (a random order per draw; trials
    reporting together are decided in random order). Returns the means over draws of ASHA's trial steps / the full
    run's (the time ratio when a step costs in proportion to the trials in it: a GPU at full batches) and of its shared
    steps / the full run's (when a step costs the same however many trials it holds: the bound for a tiny model)."""
    import numpy as np

    rng = np.random.default_rng(0)
    rungs = sorted((grace * factor**k for k in range(64) if grace * factor**k < steps), reverse=True)
    full_group_steps = -(-trials // slots) * steps
    work, shared = [], []
    for _ in range(draws):
        quality = rng.permutation(trials)
        recorded: dict[float, list[int]] = {rung: [] for rung in rungs}
        step, waiting, running = dict.fromkeys(range(trials), 0), list(range(trials)), list[int]()
        group_steps = trial_steps = 0
        while waiting or running:
            free = slots - len(running)
            running, waiting = running + waiting[:free], waiting[free:]
            group_steps, trial_steps = group_steps + 1, trial_steps + len(running)
            for trial in rng.permutation(running).tolist():
                step[trial] += 1
                rung = next((rung for rung in rungs if step[trial] >= rung), None)
                if step[trial] >= steps:
                    running.remove(trial)
                elif step[trial] % eval_every == 0 and rung is not None and trial not in recorded[rung]:
                    seen = [quality[t] for t in recorded[rung]]
                    recorded[rung].append(trial)
                    if seen and quality[trial] < np.percentile(seen, (1 - 1 / factor) * 100):
                        running.remove(trial)
        work.append(trial_steps / (trials * steps))
        shared.append(group_steps / full_group_steps)
    return {"trial_steps_ratio": float(np.mean(work)), "group_steps_ratio": float(np.mean(shared))}


# --------------------------------------------------------------------------- the report


def print_table(report: dict[str, Any]) -> None:
    results = report["results"]
    if "cotrained" in results:
        row = results["cotrained"]
        print(f"{'(a) trials':28s} {'wall s':>9s} {'trials/h':>9s} {'running s':>10s}")
        print(f"{'co-trained K=8, one host':28s} {row['cotrained_wall_s']:9.1f} {row['cotrained_trials_per_hour']:9.0f}"
              f" {row['cotrained_running_s']:10.1f}")
        print(f"{'one trial per process':28s} {row['one_per_process_wall_s']:9.1f} "
              f"{row['one_per_process_trials_per_hour']:9.0f} {row['one_per_process_running_s']:10.1f}")
    if "asha" in results:
        part = results["asha"]
        print(f"{'(b) 16 trials':28s} {'wall s':>9s} {'steps':>9s} {'best':>10s} {'trials/step':>12s}")
        for name in ("asha", "full"):
            run = part[name]
            print(f"{name:28s} {run['wall_s']:9.1f} {run['trial_steps']:9d} {run['best_last_score']:10.3f} "
                  f"{run['trial_steps_per_group_step']:12.2f}")
        print("ASHA's time ratio in theory (no fixed costs):", {k: round(v, 3) for k, v in part["theory"].items()})
    print({key: round(value, 3) for key, value in report.items() if isinstance(value, float)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    machine_info = machine("torch")
    report: dict[str, Any] = {"results": {}}
    if "cotrained" in args.parts:
        report["results"]["cotrained"] = cotrained_part(args)
        report["cotrained_trials_speedup"] = report["results"]["cotrained"]["speedup"]
        report["cotrained_trials_per_group_step"] = report["results"]["cotrained"]["cotrained_trials_per_group_step"]
    if "asha" in args.parts:
        report["results"]["asha"] = asha_part(args)
        report["asha_time_ratio"] = report["results"]["asha"]["time_ratio"]
        report["asha_best_gap"] = report["results"]["asha"]["best_gap"]
        report["asha_time_ratio_theory"] = report["results"]["asha"]["theory"]
    print_table(report)
    report |= {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")} | {"out": str(args.out)},
               "machine": machine_info, "command": command("search", argv)}
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
