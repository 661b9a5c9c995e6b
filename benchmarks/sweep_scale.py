"""Benchmark: the driver's scheduling of the study's 310 fine-tunes on 8 (fake) GPUs over 2 nodes.

    python -m benchmarks.sweep_scale [--out FILE] [--ideal-s 60] [--fresh-workers] [--queue-ahead Q]
                                     [--sweep configs/sweeps/lora_land.yaml] [--runs ours,co_train_auto,co_train_4]

Stand-in jobs sleep instead of training; the scheduling is the real driver's: `orchestrator.scheduler.run_units`
(submit everything, collect, resubmit a job whose node was lost) over `orchestrator.units.SingleJob` units,
`submission_order` (base evaluations first, then longest first), `resources.job_demand` (plan's GPU share from the
memory estimate), `resources.submit_task` (the job key as task name, no Ray-side retries) and `job_task`, on a real Ray
cluster on loopback (`infra/local_cluster.py`: a head and 2 worker nodes advertising 4 fake GPUs and 24 CPUs each, so
only GPUs bind). Each job sleeps `plan`'s wall-time estimate at its GPU share
(`hours`), saving its progress as often as the sweep checkpoints (`checkpoint_every / max_steps` of its length: 2.5%)
and resuming from it when resubmitted, as real jobs do; the sleeps are scaled so that a run's ideal lower bound is
`--ideal-s` seconds:

    ideal = max(sum(gpus_i * sleep_i) / GPUs, max(sleep_i))

A warm-up pass (the same jobs, sleeps scaled to a quarter of that) first starts the worker processes, then eight
timed runs on the same cluster (`--runs` picks some):
1. ours: makespan / ideal, GPU utilisation (sum(gpus_i * sleep_i) / (GPUs * makespan)), scheduling overhead per job;
2. submit_all: ours with every job submitted to Ray at once (queue_ahead huge) instead of the driver's window;
3. node_loss: ours, with a worker node (raylet and workers) SIGKILLed once 30% of the sweep's GPU-time is done, and a
   replacement node started at once, as an autoscaler would; the driver resubmits the jobs of the lost node. Also
   reported against the bound for the capacity actually there (4 GPUs from the kill until the replacement joined);
4. node_loss_submit_all: 3 with every job submitted at once (a resubmitted job then queues behind all the others);
5. catalogue_order: ours with the jobs in catalogue order instead of longest first (what LPT is worth);
6. naive: one whole GPU per job, catalogue order, each job sleeping plan's estimate on a whole GPU (`gpu_hours`).
   Under plan's model (a job at a 1/k share runs k times slower) that is the same GPU-time as ours: same ideal.
   `--naive-sleep hours` makes a naive job as slow as a packed one instead (jobs that leave a GPU mostly idle).
7. co_train_auto, 8. co_train_4: the sweep with `resources.co_train` auto or 4, through the driver's co-training path
   (`orchestrator.scheduler.run_units` over `orchestrator.units.work_units`: plan's groups, each one Ray task with the
   group's GPU share from `plan_group`, longest first). A group's stand-in sleeps plan's estimate for the group
   (`CoTrainGroup.planned_s`: its
   members' compute one after another on the group's share), at the same seconds per planned hour as the per-job runs.
   That model gives co-training no speed-up: under it a group of K takes the GPU-time of its K jobs (the same GPU-time
   as ours, so the same ideal, as long as no group needs more than one GPU), so these rows measure scheduling with
   groups (fewer, longer, larger units) and the driver's overhead per unit, not training speed (benchmarks/co_train.py
   measures that). Reported against the run's own ideal (from its units' sleeps and shares) and against ours.

Scheduling overhead per job = mean of (a) the gap between a job's start and the end of the previous job run by the
same worker process (the time a leased slot sits idle between two jobs; the first job of each worker is counted
under worker start-up instead), (b) the time from a job's end to the driver holding its result, (c) sleep overshoot.

Stand-ins reuse worker processes. Real GPU jobs get a fresh process each (`max_calls=1`, see `job_task`); on this
machine 2 cores start every worker of 8 fake GPUs, about one a second, which would measure process start-up, not
scheduling: `--fresh-workers` runs it that way anyway.

Prints a table and writes JSON (default benchmarks/results/sweep_scale.json) with top-level `makespan_ratio`,
`makespan_ratio_node_loss`, `overhead_s_per_job`, `naive_makespan_ratio` and `co_train_makespan_ratio` (co_train_auto's
makespan over ours' ideal); a run left out by `--runs` gives null. In the co-training rows "jobs" counts units (a group
is one) and the overhead is per unit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from statistics import mean
from typing import Any

# Read when ray is imported: keeps 127.0.0.1 (infra/README.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from benchmarks.common import RESULTS, command, machine, write_report
from core.paths import CONFIG_DIR
from infra.local_cluster import LocalCluster, free_port_block
from jobs.config import JobConfig
from orchestrator import notes
from orchestrator.cluster import connect_ray
from orchestrator.config import SweepConfig, expand_jobs, load_sweep
from orchestrator.plan import plan_job
from orchestrator.resources import job_demand, job_task
from orchestrator.scheduler import SchedulerSettings, run_units
from orchestrator.sweep import submission_order
from orchestrator.units import CoTrainGroup, JobOutcome, RayTasks, SingleJob, WorkUnit, work_units

DEFAULT_OUT = RESULTS / "sweep_scale.json"
NODES, GPUS_PER_NODE, CPUS_PER_NODE = 2, 4, 24
KILL_AT = 0.30
WARM_UP_FRACTION = 0.25
SUBMIT_ALL = 1e9  # a queue_ahead that submits every job at once (the driver before it held a queue)
CO_TRAIN: dict[str, Any] = {"co_train_auto": "auto", "co_train_4": 4}  # run name -> resources.co_train
RUNS = ("ours", "submit_all", "node_loss", "node_loss_submit_all", "catalogue_order", "naive", *CO_TRAIN)


def stand_in(seconds: float, state: str) -> dict[str, Any]:
    """A job: sleep `seconds`, less what its last checkpoint holds. The file `state` keeps the attempt's start and node
    and the seconds checkpointed (`lose_node` fills that in for the jobs it interrupts). Returns when and where it
    ran."""
    import psutil
    import ray

    path = Path(state)
    checkpointed = json.loads(path.read_text())["checkpointed"] if path.exists() else 0.0
    start, node = time.time(), ray.get_runtime_context().get_node_id()
    path.write_text(json.dumps({"start": start, "node": node, "checkpointed": checkpointed, "seconds": seconds}))
    time.sleep(seconds - checkpointed)
    return {
        "start": start,
        "end": time.time(),
        "slept": seconds - checkpointed,
        "resumed_from": checkpointed,
        "node": node,
        "pid": os.getpid(),
        "created": psutil.Process().create_time(),
    }


def stand_in_unit(unit: JobConfig | list[JobConfig], sleeps: str, states: str, _: str) -> dict[str, Any]:
    """A unit of a co-training run as the driver's `run_units` submits it (a single job, or a group's members, then the
    three strings it passes for tracking, here the stand-in's settings): `stand_in` for the seconds that the JSON file
    `sleeps` gives under the unit's first job key, its state in the folder `states`; a group's result names every
    member finished."""
    members = unit if isinstance(unit, list) else [unit]
    key = members[0].job_key
    result = stand_in(json.loads(Path(sleeps).read_text())[key], str(Path(states) / key.replace("/", "_")))
    return result | {"members": {job.job_key: {"score": 0.0} for job in members}}


class CountedTask:
    """A Ray remote function that counts the attempts submitted through it (`.options(...)` as `submit_task` calls
    it)."""

    def __init__(self, task: Any) -> None:
        self.task, self.submitted = task, 0

    def options(self, **options: Any) -> Any:
        self.submitted += 1
        return self.task.options(**options)


def lose_node(cluster: LocalCluster, node: str, states: Path, checkpoint_fraction: float) -> list[float]:
    """Checkpoint, as of now, every job running on `node` (whole checkpoint intervals since its attempt started), then
    SIGKILL the node's raylet and workers (the machine is gone). Returns the seconds checkpointed of each job it
    interrupted."""
    now, node_id, interrupted = time.time(), cluster.node_id(node), []
    for path in states.iterdir():
        state = json.loads(path.read_text())
        if state["node"] == node_id and state["start"] + state["seconds"] - state["checkpointed"] > now:
            every = state["seconds"] * checkpoint_fraction
            state["checkpointed"] += max(0.0, (now - state["start"]) // every * every)  # started after `now`: nothing
            path.write_text(json.dumps(state))
            interrupted.append(round(state["checkpointed"], 3))
    cluster.kill_node(node)
    return interrupted


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results (default: %(default)s)")
    parser.add_argument(
        "--ideal-s", type=float, default=60.0, help="ideal lower bound of a run in seconds (default: %(default)s)"
    )
    parser.add_argument(
        "--fresh-workers", action="store_true", help="a new worker process per job, as real GPU jobs get"
    )
    parser.add_argument("--naive-sleep", choices=["gpu_hours", "hours"], default="gpu_hours",
                        help="plan's estimate a naive job sleeps (default %(default)s: a whole GPU makes it faster)")
    parser.add_argument(
        "--queue-ahead",
        type=float,
        default=None,
        help="the driver's resources.queue_ahead (default: the sweep's); a large value submits every job at once",
    )
    parser.add_argument(
        "--sweep",
        type=Path,
        default=CONFIG_DIR / "sweeps" / "lora_land.yaml",
        help="sweep whose fine-tunes are stood in for",
    )
    parser.add_argument(
        "--runs",
        default=",".join(RUNS),
        help="comma-separated runs to time, always in the order of the default (default: all: %(default)s)",
    )
    args = parser.parse_args(argv)
    args.runs = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = [name for name in args.runs if name not in RUNS]
    if unknown or not args.runs:
        parser.error(
            f"--runs: choose one or more of {', '.join(RUNS)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    if args.ideal_s <= 0:
        parser.error("--ideal-s must be > 0")
    if args.queue_ahead is not None and args.queue_ahead < 0:
        parser.error("--queue-ahead must be >= 0")
    return args


def timed_run(
    units: list[WorkUnit],
    task: CountedTask,
    sweep: SweepConfig,
    on_result: Callable[[WorkUnit, float], None] | None = None,
    queue_ahead: float | None = None,
) -> tuple[float, float, dict[str, dict[str, Any]], int]:
    """All units through the driver's scheduler, `run_units` (each submitting through `task`); returns `timed`'s
    figures, keyed by unit (a group by its key). `on_result(unit, start)` follows progress."""

    def drive(record: Callable[[WorkUnit, dict[str, Any]], None]) -> tuple[dict[str, JobOutcome], int]:
        before = task.submitted
        settings = SchedulerSettings(sweep.retries, sum(len(unit.jobs) for unit in units),
                                     sweep.resources.queue_ahead if queue_ahead is None else queue_ahead,
                                     on_result=record)
        outcomes = run_units(units, settings)
        return outcomes, task.submitted - before - len(units)

    return timed(drive, on_result)


def timed(
    drive: Callable[[Callable[[WorkUnit, dict[str, Any]], None]], tuple[dict[str, JobOutcome], int]],
    on_result: Callable[[WorkUnit, float], None] | None = None,
) -> tuple[float, float, dict[str, dict[str, Any]], int]:
    """`drive(record)` runs the stand-ins through the driver, which calls `record` with each finished one's result, and
    returns the outcomes and how many attempts it resubmitted. Returns (start, end, each result plus `seen`: when the
    driver got it, resubmitted attempts); raises if a stand-in failed. `on_result(unit, start)` follows progress."""
    results: dict[str, dict[str, Any]] = {}
    started = time.time()

    def record(unit: WorkUnit, result: dict[str, Any]) -> None:
        results[unit.key] = result | {"seen": time.time()}
        if on_result:
            on_result(unit, started)

    outcomes, resubmitted = drive(record)
    failed = [o for o in outcomes.values() if o.state != "finished"]
    if failed:
        raise RuntimeError(f"{len(failed)} stand-in jobs failed, e.g. {failed[0].error}")
    return started, time.time(), results, resubmitted


def figures(started: float, ended: float, results: dict[str, dict[str, Any]], resubmitted: int, sleep: dict[str, float],
            gpus: dict[str, float], ideal: float, gpus_total: int) -> dict[str, Any]:
    """Makespan against the ideal, GPU utilisation, and the overhead per job (see the module doc)."""
    makespan = ended - started
    by_worker: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for result in results.values():
        by_worker[result["pid"]].append(result)
    gaps, worker_starts = [], []
    for runs in by_worker.values():
        runs.sort(key=lambda r: r["start"])
        worker_starts.append(runs[0]["start"] - max(runs[0]["created"], started))
        gaps += [later["start"] - earlier["end"] for earlier, later in zip(runs, runs[1:])]
    to_driver = [r["seen"] - r["end"] for r in results.values()]
    overshoot = [r["end"] - r["start"] - r["slept"] for r in results.values()]
    parts = {
        "idle_between_jobs": mean(gaps) if gaps else 0.0,
        "result_to_driver": mean(to_driver),
        "sleep_overshoot": mean(overshoot),
    }
    return {
        "jobs": len(results),
        "makespan_s": round(makespan, 2),
        "ideal_s": round(ideal, 2),
        "makespan_ratio": round(makespan / ideal, 4),
        "gpu_utilisation": round(sum(gpus[k] * sleep[k] for k in results) / (gpus_total * makespan), 4),
        "overhead_s_per_job": round(sum(parts.values()), 3),
        "overhead_parts_s": {k: round(v, 3) for k, v in parts.items()},
        "jobs_after_a_job_on_the_same_worker": len(gaps),
        "worker_processes": len(by_worker),
        "worker_start_s_mean": round(mean(worker_starts), 3),
        "nodes_used": len({r["node"] for r in results.values()}),
        "resubmitted": resubmitted,
        "resumed_jobs": sum(r["resumed_from"] > 0 for r in results.values()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine_info = machine()  # ray is imported once the cluster's environment is set
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the cluster
    sweep = load_sweep(args.sweep)
    sweep.evaluate_base = False  # the 310 fine-tunes (base evaluations are 0.2% of plan's GPU-hours)
    if args.queue_ahead is not None:
        sweep.resources.queue_ahead = args.queue_ahead
    jobs = expand_jobs(sweep)
    plans = {job.job_key: plan_job(job, sweep.resources) for job in jobs}
    shares = {key: p.gpus for key, p in plans.items()}
    gpus_total = NODES * GPUS_PER_NODE
    scale = args.ideal_s / max(
        sum(p.gpus * p.hours for p in plans.values()) / gpus_total, max(p.hours for p in plans.values())
    )
    ours_sleep = {key: p.hours * scale for key, p in plans.items()}
    naive_sleep = {key: getattr(p, args.naive_sleep) * scale for key, p in plans.items()}
    ideal = max(sum(shares[k] * s for k, s in ours_sleep.items()) / gpus_total, max(ours_sleep.values()))
    print(f"{len(jobs)} stand-in jobs sleeping {min(ours_sleep.values()):.2f}-{max(ours_sleep.values()):.2f} s "
          f"(plan's estimated hours x {scale:.2e}); ideal lower bound {ideal:.1f} s on {gpus_total} GPUs", flush=True)

    checkpoint_fraction = sweep.training.checkpoint_every / sweep.training.max_steps
    scratch = Path(tempfile.mkdtemp(prefix="sweep_scale-"))
    states = scratch / "states"
    cluster = LocalCluster(free_port_block())
    notes.console.quiet = True  # the driver's line per job, x 1,550 here, is noise: the table below is the output
    runs: dict[str, dict[str, Any]] = {}
    try:
        began = time.time()
        cluster.start(workers=NODES, num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE)
        print(
            f"cluster up in {time.time() - began:.0f} s: head + {NODES} nodes x {GPUS_PER_NODE} fake GPUs", flush=True
        )
        os.environ.update(cluster.env())
        connect_ray()
        task = CountedTask(job_task(stand_in, sweep, reuse_workers=not args.fresh_workers))
        ordered = submission_order(jobs, sweep)

        def demand(job: JobConfig) -> dict[str, float]:
            return job_demand(job, sweep)

        def ours(
            jobs: list[JobConfig], sleep: dict[str, float], resources: Callable[[JobConfig], dict[str, float]] = demand
        ) -> list[WorkUnit]:
            """`jobs` as units of stand-ins asking Ray for `resources` (the driver's job_demand, or the naive one); job
            states in `states`."""
            fresh_folder(states)
            state = {job.job_key: str(states / job.job_key.replace("/", "_")) for job in jobs}
            return [SingleJob(job, task, (sleep[job.job_key], state[job.job_key]), resources(job)) for job in jobs]

        began = time.time()
        timed_run(ours(ordered, {k: s * WARM_UP_FRACTION for k, s in ours_sleep.items()}), task, sweep)
        print(f"warm-up pass (worker processes started) in {time.time() - began:.0f} s", flush=True)
        print("\n| run | jobs | makespan s | ideal s | ratio | GPU util | overhead s/job | worker processes | nodes |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)

        if "ours" in args.runs:
            runs["ours"] = figures(
                *timed_run(ours(ordered, ours_sleep), task, sweep), ours_sleep, shares, ideal, gpus_total
            )
            print_row("ours", runs["ours"])

        if "submit_all" in args.runs:
            runs["submit_all"] = figures(
                *timed_run(ours(ordered, ours_sleep), task, sweep, queue_ahead=SUBMIT_ALL),
                ours_sleep,
                shares,
                ideal,
                gpus_total,
            )
            print_row("submit_all", runs["submit_all"])
        work = sum(shares[k] * s for k, s in ours_sleep.items())
        killed: list[str] = []

        def node_loss_run(queue_ahead: float | None) -> dict[str, Any]:
            """A run in which a worker node is lost at KILL_AT of the work and a replacement joins, as an autoscaler
            would."""
            events: dict[str, Any] = {}
            done_work: list[float] = []

            def kill_and_replace() -> None:
                victim = next(name for name in cluster.workers if name not in killed)
                killed.append(victim)
                events["checkpointed_s_of_interrupted_jobs"] = lose_node(cluster, victim, states, checkpoint_fraction)
                events["killed_at_s"] = round(time.time() - events["started"], 2)
                cluster.add_worker(CPUS_PER_NODE, GPUS_PER_NODE)
                events["replacement_joined_after_s"] = round(time.time() - events["started"], 2)

            killer = threading.Thread(target=kill_and_replace)

            def lose_a_node(unit: WorkUnit, started: float) -> None:
                done_work.append(shares[unit.key] * ours_sleep[unit.key])
                if sum(done_work) >= KILL_AT * work and not events:
                    events.update(started=started, jobs_done_at_kill=len(done_work))
                    killer.start()

            loss = timed_run(ours(ordered, ours_sleep), task, sweep, lose_a_node, queue_ahead)
            killer.join()
            del events["started"]
            run = figures(*loss, ours_sleep, shares, ideal, gpus_total) | events
            # the bound for the capacity that was there: GPUS_PER_NODE fewer GPUs from the kill until the replacement
            # joined
            down = events["replacement_joined_after_s"] - events["killed_at_s"]
            capacity_ideal = max(ideal + down * GPUS_PER_NODE / gpus_total, max(ours_sleep.values()))
            return run | {"ideal_for_capacity_present_s": round(capacity_ideal, 2),
                          "makespan_ratio_vs_capacity_present": round(run["makespan_s"] / capacity_ideal, 4)}

        for name, queue_ahead in (("node_loss", None), ("node_loss_submit_all", SUBMIT_ALL)):
            if name in args.runs:
                runs[name] = node_loss_run(queue_ahead)
                print_row(name, runs[name])

        if "catalogue_order" in args.runs:
            runs["catalogue_order"] = figures(
                *timed_run(ours(jobs, ours_sleep), task, sweep), ours_sleep, shares, ideal, gpus_total
            )
            print_row("catalogue_order", runs["catalogue_order"])

        def one_gpu(job: JobConfig) -> dict[str, float]:
            return {"CPU": sweep.resources.cpus_per_job, "GPU": 1.0}

        if "naive" in args.runs:
            runs["naive"] = figures(
                *timed_run(ours(jobs, naive_sleep, one_gpu), task, sweep),
                naive_sleep,
                {k: 1.0 for k in plans},
                ideal,
                gpus_total,
            )
            print_row("naive", runs["naive"])

        for name, setting in CO_TRAIN.items():
            if name in args.runs:
                runs[name] = co_train_figures(jobs, sweep, setting, scale, ideal, scratch, args.fresh_workers)
                print_row(name, runs[name])
    finally:
        import ray

        ray.shutdown()
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "makespan_ratio": runs.get("ours", {}).get("makespan_ratio"),
        "makespan_ratio_node_loss": runs.get("node_loss", {}).get("makespan_ratio"),
        "overhead_s_per_job": runs.get("ours", {}).get("overhead_s_per_job"),
        "naive_makespan_ratio": runs.get("naive", {}).get("makespan_ratio"),
        "co_train_makespan_ratio": runs.get("co_train_auto", {}).get("makespan_ratio_vs_ours_ideal"),
        "goals": {"makespan_ratio": 1.10, "makespan_ratio_node_loss": 1.25, "overhead_s_per_job": 0.5},
        "runs": runs,
        "settings": {
            "sweep": str(args.sweep),
            "jobs": len(jobs),
            "ideal_s": args.ideal_s,
            "seconds_per_planned_hour": scale,
            "naive_sleep": args.naive_sleep,
            "checkpoint_every_fraction_of_a_job": checkpoint_fraction,
            "nodes": NODES,
            "gpus_per_node": GPUS_PER_NODE,
            "cpus_per_node": CPUS_PER_NODE,
            "kill_at_fraction": KILL_AT,
            "fresh_workers": args.fresh_workers,
            "warm_up_fraction": WARM_UP_FRACTION,
            "queue_ahead": sweep.resources.queue_ahead,
            "runs": args.runs,
            "co_train": CO_TRAIN,
        },
        "machine": machine_info
        | {"ray": ray.__version__, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "command": command("sweep_scale", argv),
    }
    write_report(report, args.out)
    print(
        f"\nmakespan_ratio {report['makespan_ratio']}, makespan_ratio_node_loss {report['makespan_ratio_node_loss']}, "
        f"overhead_s_per_job {report['overhead_s_per_job']}, naive_makespan_ratio {report['naive_makespan_ratio']}, "
        f"co_train_makespan_ratio {report['co_train_makespan_ratio']} -> {args.out}"
    )
    return 0


def co_train_figures(
    jobs: list[JobConfig],
    sweep: SweepConfig,
    setting: Any,
    scale: float,
    ours_ideal: float,
    scratch: Path,
    fresh_workers: bool,
) -> dict[str, Any]:
    """A co-training run (see the module doc): `jobs` as the driver's units with `resources.co_train` at `setting`, each
    unit sleeping plan's estimate for it at `scale` seconds per planned hour. `figures` against the run's own ideal,
    with its units and groups, its GPU-time, and its makespan against `ours_ideal`."""
    co_sweep = sweep.model_copy(deep=True)
    co_sweep.resources.co_train = setting
    sleeps = scratch / "co_train_sleeps.json"  # by each unit's first job key, what `stand_in_unit` gets
    task = CountedTask(job_task(stand_in_unit, co_sweep, reuse_workers=not fresh_workers))
    units = work_units(jobs, co_sweep, RayTasks(task, task, (str(sleeps), str(fresh_folder(scratch / "states")), "")))
    sleep = {unit.key: unit.planned_s / 3600 * scale for unit in units}
    shares = {unit.key: unit.demand.get("GPU", 0.0) for unit in units}
    gpus_total = NODES * GPUS_PER_NODE
    gpu_seconds = sum(shares[key] * seconds for key, seconds in sleep.items())
    ideal = max(gpu_seconds / gpus_total, max(sleep.values()))
    sleeps.write_text(json.dumps({unit.jobs[0].job_key: sleep[unit.key] for unit in units}))
    run = figures(*timed_run(units, task, co_sweep), sleep, shares, ideal, gpus_total)
    sizes = sorted(len(unit.jobs) for unit in units if isinstance(unit, CoTrainGroup))
    return run | {
        "co_train": setting,
        "units": len(units),
        "fine_tunes": sum(len(unit.jobs) for unit in units),
        "groups": len(sizes),
        "members_per_group": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]} if sizes else {},
        "gpus_per_unit": sorted(set(shares.values())),
        "unit_sleep_s": [round(min(sleep.values()), 2), round(max(sleep.values()), 2)],
        "gpu_seconds": round(gpu_seconds, 1),
        "ideal_of_ours_s": round(ours_ideal, 2),
        "makespan_ratio_vs_ours_ideal": round(run["makespan_s"] / ours_ideal, 4),
    }


def fresh_folder(path: Path) -> Path:
    """`path` as an empty folder."""
    path.mkdir(exist_ok=True)
    for old in path.iterdir():
        old.unlink()
    return path


def print_row(name: str, f: dict[str, Any]) -> None:
    print(
        f"| {name} | {f['jobs']} | {f['makespan_s']:.1f} | {f['ideal_s']:.1f} | {f['makespan_ratio']:.3f} | "
        f"{f['gpu_utilisation']:.3f} | "
        f"{f['overhead_s_per_job']:.3f} | {f['worker_processes']} | {f['nodes_used']} |",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
