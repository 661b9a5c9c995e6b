"""Training throughput: our loop (`jobs.train.train`, packed) against a naive Hugging Face `Trainer` baseline.

Both sides fine-tune the same 4-bit nf4 (double-quantized) base with the same LoRA adapter (all-linear,
r 8), seed, examples in the same order, effective batch, learning rate, scheduler and optimizer, for
`--warmup-steps + --steps` optimizer steps; the warm-up steps are not timed. The only difference is
how examples reach the model:

- ours:     `jobs.train.train`: the examples of one optimizer step packed padding-free into rows of
            `micro_batch_size * max_seq_length` tokens (one forward-backward per row).
- baseline: `transformers.Trainer`, a collator that right-pads each micro-batch to its longest
            example, no packing, `gradient_accumulation_steps` forward-backwards per optimizer step,
            no eval, no saving, logging off, report_to none, dataloader workers 0.

Trained tokens are the non-padding tokens the model was fed (counted by a forward pre-hook on the
model, identically for both sides); tokens/s is trained tokens over the wall time of the timed steps.
Peak memory: on a CPU the growth of the peak resident set (ru_maxrss) over the resident set just
before training, each side in its own process so the peaks do not mix; on a GPU
`torch.cuda.max_memory_allocated` (weights included) and the reserved peak.

    python -m benchmarks.train_throughput [--out FILE] [--base tiny-llama] [--task demo_colors] [--steps 30]
    python -m benchmarks.train_throughput --gpu-shape mistral-7b   # random-init Mistral-7B shape, 4-bit, needs a GPU

Writes JSON (default benchmarks/results/train_throughput.json) with top-level `speedup`
(ours tokens/s / baseline tokens/s), `ours`, `baseline`, `settings`, `machine` and `command`.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, collect, command, emit, machine, random_4bit_model, start_child, write_report

DEFAULT_OUT = RESULTS / "train_throughput.json"
SIDES = ("ours", "baseline")
GPU_SHAPES = {"mistral-7b": "mistral-7b"}  # --model value -> catalogue base model whose real shape is built at random
CUDA_CONTEXT_BYTES = 512 * 2**20  # per-process CUDA context, outside torch's allocator (estimate)
GPU_BYTES = 80 * 10**9  # "one 80 GB GPU"
TRAINING_ARGUMENTS = ("micro_batch_size", "gradient_accumulation_steps", "max_seq_length", "learning_rate",
                      "lr_scheduler", "warmup_ratio", "gradient_checkpointing", "seed")  # TrainingSettings' names


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from core.schemas import LoraSettings, TrainingSettings

    study, lora = TrainingSettings(), LoraSettings()
    parser = argparse.ArgumentParser(
        description="Trained tokens/s and peak memory of jobs.train (packed) vs a padded transformers.Trainer baseline."
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON result file (default: %(default)s)")
    parser.add_argument(
        "--base", default="tiny-llama", help="catalogue base model, loaded in 4-bit (default: %(default)s)"
    )
    parser.add_argument(
        "--task", default="demo_colors", help="catalogue task whose training rows are used (default: %(default)s)"
    )
    parser.add_argument(
        "--model",
        default="base",
        choices=["base", *GPU_SHAPES],
        help="base: the --base model; mistral-7b: a random-initialised model of Mistral-7B's real shape "
        "in 4-bit (needs a CUDA GPU; tokens come from --base's tokenizer)",
    )
    parser.add_argument("--gpu-shape", choices=list(GPU_SHAPES), help="same as --model NAME")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per side (default: %(default)s)")
    parser.add_argument(
        "--warmup-steps", type=int, default=1, help="untimed optimizer steps run first (>= 1, default: %(default)s)"
    )
    parser.add_argument("--micro-batch-size", type=int, default=study.micro_batch_size, help="the study's: %(default)s")
    parser.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=study.gradient_accumulation_steps,
        help="the study's: %(default)s",
    )
    parser.add_argument("--max-seq-length", type=int, default=study.max_seq_length, help="the study's: %(default)s")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=1e-2,
        help="default %(default)s (the study's 2e-4 barely moves a tiny random model; speed does not depend on it)",
    )
    parser.add_argument("--lr-scheduler", default=study.lr_scheduler, choices=["cosine", "linear", "constant"])
    parser.add_argument(
        "--warmup-ratio",
        type=float,
        default=study.warmup_ratio,
        help="learning-rate warm-up (the study's: %(default)s)",
    )
    parser.add_argument("--lora-r", type=int, default=lora.r)
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=study.gradient_checkpointing,
        help="on both sides (the study's default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=study.seed)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/OpenMP threads per side, 0 = torch's default (default: %(default)s, as a Ray worker with "
        "num_cpus=1 runs; on a shared CPU, spare threads spin against other processes and swamp the result)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="runs per side, interleaved ours/baseline/baseline/ours...; the median time counts, the largest peak "
        "memory (default: 2 for --model base, 1 for a 7B shape)",
    )
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side in this process
    args = parser.parse_args(argv)
    if args.gpu_shape:
        args.model = args.gpu_shape
    if args.repeats is None:
        args.repeats = 2 if args.model == "base" else 1
    if args.steps < 1 or args.warmup_steps < 1 or args.repeats < 1:
        parser.error("--steps, --warmup-steps and --repeats must be >= 1")
    return args


def job_config(args: argparse.Namespace, output_dir: str):
    """The JobConfig both sides train from (ours runs it through `jobs.train.train`): the command line's training
    settings, packed, logged every step, checkpointed only after the timed steps."""
    from benchmarks.common import benchmark_job

    training = {name: getattr(args, name) for name in TRAINING_ARGUMENTS}
    return benchmark_job(GPU_SHAPES.get(args.model, args.base), args.task, output_dir, lora={"r": args.lora_r},
                         max_steps=args.warmup_steps + args.steps, packing=True, log_every=1, **training)


# --------------------------------------------------------------------------- measuring one side


@dataclass
class Meter:
    """Counts what the model is fed (forward hooks) and stamps the end of every optimizer step."""

    device: str
    steps: list[dict[str, float]] = field(default_factory=list)
    _real: list[Any] = field(default_factory=list)
    _total: int = 0
    _passes: int = 0
    _losses: list[Any] = field(default_factory=list)

    def attach(self, model) -> None:
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.register_forward_hook(self._after, with_kwargs=True)

    def _before(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self._total += ids.numel()
        self._real.append(mask.sum() if mask is not None else ids.numel())  # summed lazily: no sync per pass
        self._passes += 1

    def _after(self, module, args, kwargs, output) -> None:
        if getattr(output, "loss", None) is not None:
            self._losses.append(output.loss.detach())

    def end_step(self, step: int, loss: float | None = None) -> None:
        """Close a step; `loss` is the step's loss when the side reports it (ours: its forward passes carry no labels,
        so the model's output holds no loss to hook), else the sum of the losses its forward passes returned."""
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        real = int(sum(int(r) for r in self._real))
        self.steps.append(
            {
                "step": step,
                "time": time.perf_counter(),
                "tokens": real,
                "padding": self._total - real,
                "passes": self._passes,
                "loss": loss if loss is not None else float(sum(float(x) for x in self._losses)),
                **self._peaks(),
            }
        )
        self._real, self._total, self._passes, self._losses = [], 0, 0, []

    def _peaks(self) -> dict[str, float]:
        """Peaks so far (monotonic): resident set (VmHWM since its reset), and GPU allocated on a GPU."""
        from jobs.peak_memory import peak_memory_mb, peak_rss_mb

        peaks = {"peak_rss_mb": peak_rss_mb()}
        if self.device == "cuda":
            peaks["peak_gpu_mb"] = peak_memory_mb("cuda")
        return peaks

    def summary(self, warmup: int) -> dict[str, Any]:
        if len(self.steps) <= warmup:
            raise RuntimeError(f"only {len(self.steps)} steps were recorded (warm-up {warmup})")
        timed = self.steps[warmup:]
        seconds = timed[-1]["time"] - self.steps[warmup - 1]["time"]
        tokens = sum(s["tokens"] for s in timed)
        return {
            "steps": len(timed),
            "trained_tokens": tokens,
            "padding_tokens": sum(s["padding"] for s in timed),
            "forward_passes": sum(s["passes"] for s in timed),
            "seconds": seconds,
            "tokens_per_second": tokens / max(seconds, 1e-9),
            "seconds_per_step": seconds / len(timed),
            "first_loss": self.steps[0]["loss"],
            "final_loss": self.steps[-1]["loss"],
            "losses": [round(step["loss"], 4) for step in self.steps],  # every step's, warm-up included: the trajectory
            # through the last optimizer step, before any final saving
            "peak_rss_through_last_step_mb": self.steps[-1]["peak_rss_mb"],
            **(
                {"peak_gpu_through_last_step_mb": self.steps[-1]["peak_gpu_mb"]}
                if "peak_gpu_mb" in self.steps[-1]
                else {}
            ),
        }


def build_model(args: argparse.Namespace, config, device: str):
    """The 4-bit base with a fresh LoRA adapter, identical on both sides for the same seed."""
    import torch

    from jobs.models import attach_lora, load_base_model

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.model == "base":
        base = load_base_model(config.base_model, config.quantization, device)
    else:
        base = random_4bit_model(config.base_model, config.quantization, device)
        torch.manual_seed(args.seed)
    return attach_lora(base, config.lora, config.training.gradient_checkpointing)


def run_ours(config, model, tokenizer, meter: Meter) -> None:
    from jobs.train import train

    train(config, model=model, tokenizer=tokenizer, on_step=lambda step, metrics: meter.end_step(step, metrics["loss"]))


def run_baseline(config, model, tokenizer, meter: Meter, device: str) -> None:
    """transformers.Trainer, padding to the longest example per micro-batch, no packing."""
    import dataclasses

    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from jobs.encoding import IGNORE
    from jobs.train import DataOrder, tokenize_task

    settings = config.training
    examples = tokenize_task(config, tokenizer)
    order = DataOrder(len(examples), settings.seed)
    count = settings.max_steps * settings.micro_batch_size * settings.gradient_accumulation_steps
    # The very examples, in the very order, that jobs.train feeds: step k gets the same effective batch on both sides.
    dataset = [
        {"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in map(order.index, range(count))
    ]
    pad_id = tokenizer.pad_token_id

    def pad_to_longest(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        pads = [width - len(f["input_ids"]) for f in features]
        return {
            "input_ids": torch.tensor([f["input_ids"] + [pad_id] * p for f, p in zip(features, pads)]),
            "labels": torch.tensor([f["labels"] + [IGNORE] * p for f, p in zip(features, pads)]),
            "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * p for f, p in zip(features, pads)]),
        }

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            meter.end_step(state.global_step)

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    extra: dict[str, Any] = {"train_sampling_strategy": "sequential"} if "train_sampling_strategy" in names else {}
    extra.update({"use_cpu": True, "dataloader_pin_memory": False} if device == "cpu" else {})
    arguments = TrainingArguments(
        output_dir=config.output_dir,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler if settings.lr_scheduler != "constant" else "constant_with_warmup",
        warmup_steps=math.ceil(settings.warmup_ratio * settings.max_steps),  # as jobs.train computes it
        weight_decay=settings.weight_decay,
        max_grad_norm=1.0,  # jobs.train clips at 1.0
        optim="paged_adamw_32bit" if device == "cuda" else "adamw_torch",  # jobs.train's `auto` optimizer
        seed=settings.seed,
        gradient_checkpointing=False,  # already set up on the model by attach_lora, as for ours
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        **extra,
    )

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):  # older transformers: no train_sampling_strategy
            return SequentialSampler(dataset)

    trainer_class = Trainer if extra.get("train_sampling_strategy") else SequentialTrainer
    trainer = trainer_class(
        model=model, args=arguments, train_dataset=dataset, data_collator=pad_to_longest, callbacks=[StepEnd()]
    )
    trainer.train()


def run_side(args: argparse.Namespace) -> dict[str, Any]:
    """One side in this process: build, train, measure; returns the side's figures."""
    import torch
    import transformers  # noqa: F401  both sides import the same modules before the memory baseline is taken
    from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: F401

    import jobs.train  # noqa: F401
    from jobs.models import load_tokenizer, resolve_device
    from jobs.peak_memory import current_rss_mb, lifetime_peak_rss_mb, reset_peak_memory, reset_peak_rss

    device = resolve_device("auto")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=f"train-throughput-{args.side}-") as tmp:
        config = job_config(args, tmp).model_copy(update={"device": device})
        tokenizer = load_tokenizer(_tokenizer_spec(args))  # --base's tokenizer, also for a random 7B shape
        model = build_model(args, config, device)
        meter = Meter(device)
        meter.attach(model)
        rss_before = current_rss_mb()
        hwm_reset = reset_peak_rss()
        if device == "cuda":
            torch.cuda.synchronize()
            reset_peak_memory(device)
            allocated_before = torch.cuda.memory_allocated()
        if args.side == "ours":
            run_ours(config, model, tokenizer, meter)
        else:
            run_baseline(config, model, tokenizer, meter, device)
        figures: dict[str, Any] = dict(meter.summary(args.warmup_steps))
        figures["examples"] = figures["steps"] * args.micro_batch_size * args.gradient_accumulation_steps
        figures["peak_rss_mb"] = lifetime_peak_rss_mb()  # whole process, loading included
        figures["rss_before_training_mb"] = rss_before
        # Peak through the last optimizer step: ours saves a checkpoint and the adapter after it, the baseline does not.
        peak_training = figures["peak_rss_through_last_step_mb"] if hwm_reset else figures["peak_rss_mb"]
        figures["peak_rss_growth_mb"] = max(0.0, peak_training - rss_before)
        figures["peak_rss_growth_source"] = (
            "VmHWM reset before training, read after the last step" if hwm_reset else "ru_maxrss"
        )
        if device == "cuda":
            peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            figures.update({
                "peak_gpu_allocated_mb": peak / 2**20,  # to the end, ours' final checkpoint and adapter saving included
                "peak_gpu_reserved_mb": reserved / 2**20,
                "gpu_allocated_before_training_mb": allocated_before / 2**20,
                "jobs_per_80gb_gpu": int(GPU_BYTES // (reserved + CUDA_CONTEXT_BYTES)),
            })
            figures["peak_mb"] = figures["peak_gpu_through_last_step_mb"]
        else:
            figures["peak_mb"] = figures["peak_rss_growth_mb"]
        figures["device"] = device
        figures["torch_threads"] = torch.get_num_threads()
    return figures


def _tokenizer_spec(args: argparse.Namespace):
    from core.catalog import load_catalog

    return load_catalog().base_model(args.base)


# --------------------------------------------------------------------------- the parent: both sides, table, JSON


def child_arguments(args: argparse.Namespace, side: str) -> list[str]:
    """This run's arguments for a child process that runs `side` alone."""
    skip = {"out", "side", "repeats", "gpu_shape"}
    arguments = ["--side", side]
    for key, value in vars(args).items():
        if key in skip or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            arguments.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            arguments += [flag, str(value)]
    return arguments


def run_child(args: argparse.Namespace, side: str) -> dict[str, Any]:
    started = time.perf_counter()
    result = collect(start_child("train_throughput", child_arguments(args, side), args.threads),
                     f"train_throughput: the {side} side")
    result["process_seconds"] = time.perf_counter() - started
    return result


def print_table(sides: dict[str, dict[str, Any]], speedup: float, gpu: bool) -> None:
    memory = "peak GPU MB" if gpu else "peak RSS +MB"
    headers = [
        "side",
        "steps",
        "examples",
        "passes",
        "trained tokens",
        "padding tokens",
        "seconds",
        "tokens/s",
        memory,
        "final loss",
    ]
    rows = [
        [
            name,
            f"{s['steps']}",
            f"{s['examples']}",
            f"{s['forward_passes']}",
            f"{s['trained_tokens']}",
            f"{s['padding_tokens']}",
            f"{s['seconds']:.2f}",
            f"{s['tokens_per_second']:.0f}",
            f"{s['peak_mb']:.0f}",
            f"{s['final_loss']:.3f}",
        ]
        for name, s in sides.items()
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    print(f"speedup (ours / baseline tokens/s): {speedup:.2f}x")
    if gpu:
        for name, s in sides.items():
            print(
                f"{name}: peak GPU allocated {s['peak_gpu_allocated_mb']:.0f} MB, reserved "
                f"{s['peak_gpu_reserved_mb']:.0f} MB "
                f"-> {s['jobs_per_80gb_gpu']} jobs per 80 GB GPU"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side:
        emit(run_side(args))
        return 0

    import torch

    if args.model != "base" and not torch.cuda.is_available():
        print(
            f"train_throughput: --model {args.model} builds a 7B-shaped 4-bit model and needs a CUDA GPU; none is "
            "visible, nothing run.",
            file=sys.stderr,
        )
        return 2
    order = [SIDES[(i + i // 2) % 2] for i in range(2 * args.repeats)]  # ours, baseline, baseline, ours, ...
    machine_info = machine("torch", "transformers", "peft", "bitsandbytes")
    wall = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for side in order:
        result = run_child(args, side)
        runs[side].append(result)
        print(f"  {side}: {result['tokens_per_second']:.0f} tokens/s over {result['steps']} steps "
              f"({result['process_seconds']:.0f} s with start-up)", flush=True)
    sides = {}
    for side in SIDES:
        # Every run of a side trains the same tokens; the side's figure is the median wall time of its timed steps.
        # The other fields (memory, loss) are those of the last run.
        side_runs = runs[side]
        sides[side] = dict(side_runs[-1])
        sides[side]["seconds"] = statistics.median(r["seconds"] for r in side_runs)
        sides[side]["seconds_per_step"] = sides[side]["seconds"] / sides[side]["steps"]
        sides[side]["tokens_per_second"] = sides[side]["trained_tokens"] / sides[side]["seconds"]
        sides[side]["runs_tokens_per_second"] = [r["tokens_per_second"] for r in side_runs]
        sides[side]["runs_peak_mb"] = [r["peak_mb"] for r in side_runs]
        sides[side]["peak_mb"] = max(sides[side]["runs_peak_mb"])
        if len({r["trained_tokens"] for r in side_runs}) != 1:
            raise SystemExit(
                f"train_throughput: the {side} runs trained different token counts: "
                f"{[r['trained_tokens'] for r in side_runs]}"
            )
    speedup = sides["ours"]["tokens_per_second"] / sides["baseline"]["tokens_per_second"]
    print_table(sides, speedup, machine_info["device"] == "cuda")
    settings = {key: value for key, value in vars(args).items() if key not in ("side", "out", "gpu_shape")}
    settings.update({
        "effective_batch": args.micro_batch_size * args.gradient_accumulation_steps,
        "quantization": "4-bit nf4, double quantization",
        "lora": f"all-linear, r {args.lora_r}",
        "optimizer": "bitsandbytes paged AdamW 32-bit" if machine_info["device"] == "cuda" else "torch AdamW",
        "ours": "jobs.train.train: packed padding-free rows of micro_batch_size * max_seq_length tokens",
        "baseline": "transformers.Trainer: right-padded to the longest example per micro-batch, no packing",
        "timing": f"{args.warmup_steps} warm-up step(s) untimed; each side in its own process; order {','.join(order)}",
        "peak_memory": "GPU: torch.cuda.max_memory_allocated (weights included)" if machine_info["device"] == "cuda"
                       else "CPU: growth of the peak resident set (VmHWM reset before training, else ru_maxrss) "
                            "over the resident set just before training",
    })
    document = {
        "speedup": speedup,
        "ours": sides["ours"],
        "baseline": sides["baseline"],
        "settings": settings,
        "machine": machine_info,
        "command": command("train_throughput", argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_seconds": time.perf_counter() - wall,
    }
    write_report(document, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
