"""The report: leaderboard files, real PNG charts, the study comparison, heuristics, correlations and the lift
predictor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.catalog import load_catalog
from tests.tracking_fixtures import BASES, SWEEP, TASKS, Sweep
from tracking import charts, report, store
from tracking import heuristics as heur

CHARTS = ("finetuned_heatmap.png", "lift_by_base_model.png", "heuristics_correlation.png", "lift_predictor.png")
SWEEP_CHARTS = tuple(c for c in CHARTS if c != "heuristics_correlation.png")  # 2 tasks: no correlation to draw


@pytest.fixture(autouse=True)
def no_cl100k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty tiktoken cache, so lengths are in a base model's tokens here even where cl100k_base is cached."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return cache


def assert_real_chart(path: Path) -> None:
    """A PNG that opens, is bigger than 200 x 200 px, and is not one flat colour (it has drawn content)."""
    import matplotlib.image

    assert path.stat().st_size > 5_000, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200, (path, pixels.shape)
    colours = np.unique(pixels[..., :3].reshape(-1, 3).round(2), axis=0)
    assert len(colours) > 20, (path, len(colours))
    non_background = (np.abs(pixels[..., :3] - pixels[0, 0, :3]).sum(axis=-1) > 0.1).mean()
    assert non_background > 0.02, (path, non_background)


def assert_drew(chart: charts.Chart, cells: int = 0, bars: int = 0, points: int = 0) -> None:
    """The chart drew exactly this data (finite heatmap cells, bars, scatter points), read off its figure."""
    assert (chart.cells, chart.bars, chart.points) == (cells, bars, points), chart
    assert_real_chart(chart.path)


# --------------------------------------------------------------------------- from the real sweep


@pytest.mark.integration
def test_report_of_the_2x2_sweep(tiny_sweep: Sweep, tmp_path: Path) -> None:
    built = report.build_report(SWEEP, tmp_path / "report", uri=tiny_sweep.uri)
    out = built.out_dir
    for name in (
        "leaderboard.csv",
        "leaderboard.md",
        "leaderboard.html",
        "runs.csv",
        "heuristics.csv",
        "correlations.csv",
        "predictor.json",
        *SWEEP_CHARTS,
    ):
        assert (out / name).is_file(), name
    assert set(built.charts) == set(SWEEP_CHARTS)
    pairs = len(BASES) * len(TASKS)
    assert_drew(built.charts["finetuned_heatmap.png"], cells=pairs)  # every (task, base model) has a score
    assert_drew(built.charts["lift_by_base_model.png"], bars=len(BASES), points=pairs)
    assert_drew(built.charts["lift_predictor.png"], points=len(TASKS))
    assert not (out / "vs_study.png").exists()  # tiny models and demo tasks are not the study's
    # Correlations over 2 tasks mean nothing: the report says so instead of drawing an empty grid.
    assert not (out / "heuristics_correlation.png").exists()
    corr = pd.read_csv(out / "correlations.csv", index_col="heuristic")
    assert corr[["base_score", "finetuned_score", "lift"]].isna().all().all() and (corr["tasks"] == 2).all()
    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board) == len(BASES) * len(TASKS)  # a row per (base model, task) job pair
    assert set(zip(board["base_model"], board["task"])) == {(b, t) for b in BASES for t in TASKS}
    for row in board.itertuples():
        assert row.finetuned_score == pytest.approx(tiny_sweep.job("train", row.base_model, row.task).result.score)
        assert row.base_score == pytest.approx(tiny_sweep.job("evaluate_base", row.base_model, row.task).result.score)
        assert row.lift == pytest.approx(row.finetuned_score - row.base_score)
    assert board.groupby("task")["best"].any().all()
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 8 and set(runs["kind"]) == {"train", "evaluate_base"}
    assert (runs["failed_generations"] >= 0).all()  # runs_frame keeps each run's eval_failed_generations
    markdown = (out / "leaderboard.md").read_text()
    for title in ("## Leaderboard", "## Best base model per task", "## Means per base model", "## Means per category",
                  "## Correlation with results", "## Predicting lift"):
        assert title in markdown
    assert (
        "n/a: needs at least 3 tasks (this sweep has 2)"
        in markdown.split("## Correlation with results")[1].split("##")[0]
    )
    assert "n/a: needs at least 3 tasks" in (out / "leaderboard.html").read_text()
    assert "<table" in (out / "leaderboard.html").read_text()
    features = pd.read_csv(out / "heuristics.csv", index_col="task")
    assert set(features.index) == set(TASKS) and list(features.columns) == [*heur.HEURISTICS, "length_unit"]
    assert features.notna().all().all() and (features["train_examples"] > 0).all()
    # Lengths in the tokens of the sweep's first base model (sorted), not in words, and the report says so.
    unit = "tokens (tiny-llama tokenizer)"
    assert built.length_unit == unit and set(features["length_unit"]) == {unit} and f"lengths in {unit}" in markdown
    words = heur.task_heuristics(load_catalog().task("demo_sentiment"), heur.WORDS.tokenize)
    assert features.loc["demo_sentiment", "input_tokens_mean"] > words["input_tokens_mean"]
    predictor = json.loads((out / "predictor.json").read_text())
    assert predictor["tasks"] == 2 and math.isfinite(predictor["loo_mae"])
    # Logged to the sweep's parent run.
    client = store.client(tiny_sweep.uri)
    assert built.parent_run_id == tiny_sweep.parent_run_id
    logged = {Path(a.path).name for a in client.list_artifacts(tiny_sweep.parent_run_id, "report")}
    assert {"leaderboard.csv", "leaderboard.md", "leaderboard.html", *SWEEP_CHARTS} <= logged
    assert "report.mean_finetuned_score" in client.get_run(tiny_sweep.parent_run_id).data.metrics
    assert client.get_run(tiny_sweep.parent_run_id).data.tags["report.length_unit"] == unit


# --------------------------------------------------------------------------- the study's models and tasks (no server)


def study_runs(tasks: list[str], bases: list[str], noise: float = 0.02) -> pd.DataFrame:
    """Runs as `report.runs_frame` returns them, with the study's scores (slightly perturbed) as ours."""
    study = pd.read_csv(report.STUDY_SCORES)
    rng = np.random.default_rng(0)
    rows: list[dict[str, object]] = []
    for row in study[study["task"].isin(tasks) & study["base_model"].isin(bases)].itertuples():
        for kind, score in (("train", row.finetuned_score), ("evaluate_base", row.base_score)):
            rows.append(
                {
                    "run_id": f"{kind}-{row.base_model}-{row.task}",
                    "job_key": f"s/{row.base_model}/{row.task}/{kind}",
                    "kind": kind,
                    "base_model": row.base_model,
                    "task": row.task,
                    "category": row.category,
                    "metric": "accuracy",
                    "score": float(np.clip(score + rng.normal(0, noise), 0, 1)),
                    "peak_memory_mb": 1.0,
                    "train_wall_time_s": 1.0,
                    "job_wall_time_s": 1.0,
                    "start_time": len(rows),
                }
            )
    return pd.DataFrame(rows, columns=report.RUN_COLUMNS)


@pytest.mark.unit
def test_report_compares_with_the_study_and_names_the_source(tmp_path: Path) -> None:
    tasks = ["glue_sst2", "boolq", "gsm8k", "winogrande", "dbpedia", "customer_support"]
    runs = study_runs(tasks, ["mistral-7b", "phi-2"])
    board = report.leaderboard(runs)
    # Synthetic heuristics: one tracks the lift exactly, one is noise, one is constant.
    lift = report.task_means(board)["lift"]
    rng = np.random.default_rng(1)
    features = pd.DataFrame(
        {name: rng.normal(size=len(lift)) for name in heur.HEURISTICS}, index=lift.index
    ).rename_axis("task")
    features["input_tokens_p95"] = 100 + 400 * lift
    features["train_examples"] = 1000.0
    with pytest.raises(ValueError, match="length_unit"):
        report.write_report(runs, tmp_path, features=features)
    built = report.write_report(runs, tmp_path, features=features, length_unit="words")
    assert built.length_unit == "words" and set(pd.read_csv(tmp_path / "heuristics.csv")["length_unit"]) == {"words"}
    assert_real_chart(tmp_path / "vs_study.png")
    for name in CHARTS:
        assert_real_chart(tmp_path / name)
    # What each chart drew is the data: a cell per scored pair, a bar per base model or compared score, a point per
    # task.
    assert_drew(built.charts["finetuned_heatmap.png"], cells=int(board["finetuned_score"].notna().sum()))
    assert_drew(built.charts["lift_by_base_model.png"], bars=2, points=int(board["lift"].notna().sum()))
    assert_drew(built.charts["vs_study.png"], bars=3 * len(tasks))
    correlations = pd.read_csv(tmp_path / "correlations.csv", index_col="heuristic")
    finite = correlations[["base_score", "finetuned_score", "lift"]].notna()
    assert_drew(built.charts["heuristics_correlation.png"], cells=int(finite.to_numpy().sum()))
    # The constant heuristic: n/a
    assert 0 < built.charts["heuristics_correlation.png"].cells < 3 * len(heur.HEURISTICS)
    assert_drew(built.charts["lift_predictor.png"], points=len(tasks))
    comparison = pd.read_csv(tmp_path / "vs_study.csv")
    assert len(comparison) == len(tasks) * 2 and comparison["gpt4_score"].notna().all()
    markdown = (tmp_path / "leaderboard.md").read_text()
    assert (
        "## Against the study" in markdown
        and "arXiv 2405.00732" in markdown
        and "lora_land_paper_scores.csv" in markdown
    )
    corr = pd.read_csv(tmp_path / "correlations.csv", index_col="heuristic")
    assert corr.loc["input_tokens_p95", "lift"] == pytest.approx(1.0)
    assert math.isnan(corr.loc["train_examples", "lift"])  # constant: no correlation defined
    assert built.predictor["tasks"] == len(tasks)
    assert built.predictor["loo_mae"] < built.predictor["baseline_loo_mae"]  # the informative heuristic helps
    means = report.means_by(board, "base_model").set_index("base_model")
    assert means.loc["mistral-7b", "tasks"] == len(tasks)
    assert set(report.means_by(board, "category")["category"]) == set(runs["category"])
    best = report.best_per_task(board).set_index("task")
    for task in tasks:
        rows = board[board["task"] == task]
        assert best.loc[task, "finetuned_score"] == rows["finetuned_score"].max()


@pytest.mark.unit
def test_leaderboard_keeps_pairs_with_a_missing_side() -> None:
    runs = study_runs(["boolq"], ["mistral-7b", "phi-2"])
    runs = runs[~((runs["kind"] == "evaluate_base") & (runs["base_model"] == "phi-2"))]
    board = report.leaderboard(runs).set_index("base_model")
    assert len(board) == 2 and math.isnan(board.loc["phi-2", "base_score"]) and math.isnan(board.loc["phi-2", "lift"])
    assert board.loc["mistral-7b", "lift"] == pytest.approx(
        board.loc["mistral-7b", "finetuned_score"] - board.loc["mistral-7b", "base_score"]
    )


@pytest.mark.unit
def test_a_blank_chart_is_told_apart_from_a_chart_with_data(tmp_path: Path) -> None:
    runs = study_runs(["boolq", "gsm8k"], ["mistral-7b", "phi-2"])
    board = report.leaderboard(runs)
    assert charts.plot_finetuned_heatmap(board, tmp_path / "full.png").cells == 4
    empty = charts.plot_finetuned_heatmap(board.assign(finetuned_score=math.nan), tmp_path / "empty.png")
    assert empty.cells == 0 and empty.path.is_file()  # a grid of n/a: nothing drawn, and the count says so
    assert charts.plot_lift_by_base_model(board.assign(lift=math.nan), tmp_path / "lift.png").bars == 0
    def targets(*values: float) -> pd.DataFrame:
        return pd.DataFrame({t: list(values) for t in report.TARGETS}, index=list("abc")[:len(values)])

    few = report.correlations(pd.DataFrame({"x": [1.0, 2.0]}, index=["a", "b"]), targets(0.1, 0.2))
    assert report.correlation_gap(few) == "n/a: needs at least 3 tasks (this sweep has 2)"
    flat = report.correlations(pd.DataFrame({"x": [1.0] * 3}, index=list("abc")), targets(0.1, 0.2, 0.3))
    assert (report.correlation_gap(flat) or "").startswith("n/a: no heuristic")
    varied = report.correlations(pd.DataFrame({"x": [1.0, 2.0, 4.0]}, index=list("abc")), targets(0.1, 0.2, 0.3))
    assert report.correlation_gap(varied) is None


# --------------------------------------------------------------------------- heuristics (pure functions)


@pytest.mark.unit
def test_heuristics_of_known_examples() -> None:
    inputs = ["a b c d", "a b", "x y z w v u"]
    outputs = ["a b", "q", "x y z w v u"]
    values = heur.example_heuristics(inputs, outputs, train_examples=123, tokenize=heur.WORDS.tokenize)
    assert set(values) == set(heur.HEURISTICS)
    assert values["input_tokens_mean"] == pytest.approx(4.0)
    assert values["input_tokens_p95"] == pytest.approx(np.percentile([4, 2, 6], 95))
    assert values["output_tokens_std"] == pytest.approx(np.std([2, 1, 6]))
    assert values["total_tokens_mean"] == pytest.approx(np.mean([6, 3, 12]))
    # ROUGE-L of output against input: 2/3 (P 1, R 0.5), 0, 1.
    assert values["io_rouge_l_mean"] == pytest.approx(np.mean([2 / 3, 0.0, 1.0]))
    assert values["train_examples"] == 123.0
    assert heur.compressibility("ab" * 500) < 0.1 < heur.compressibility("The quick brown fox jumps over the lazy dog.")
    empty = heur.summary([], "x")
    assert set(empty) == {"x_p95", "x_mean", "x_std"} and all(math.isnan(value) for value in empty.values())
    with pytest.raises(ValueError):
        heur.example_heuristics(["a"], [], 1, heur.WORDS.tokenize)


@pytest.mark.unit
def test_task_heuristics_of_a_demo_task() -> None:
    task = load_catalog().task("demo_colors")
    values = heur.task_heuristics(task, heur.length_unit(["tiny-llama"]).tokenize, limit=50)
    assert values["train_examples"] > 50 and 0 < values["io_rouge_l_mean"] < 1
    assert values["output_tokens_mean"] < values["input_tokens_mean"]


@pytest.mark.unit
def test_lengths_in_a_local_tokenizer_else_words(monkeypatch: pytest.MonkeyPatch) -> None:
    import core.catalog

    catalog = load_catalog()
    # A real base model whose tokenizer is in no cache: it is skipped, never downloaded.
    absent = catalog.base_model("llama-2-7b").model_copy(
        update={"name": "not-cached", "hf_id": "loraland-test/not-cached-anywhere"})
    fake = core.catalog.Catalog(
        {"not-cached": absent, "tiny-mistral": catalog.base_model("tiny-mistral")}, catalog.tasks
    )
    monkeypatch.setattr(core.catalog, "load_catalog", lambda: fake)
    assert heur.length_unit(["not-cached"]) == heur.WORDS
    assert heur.length_unit(["unknown-model"]) == heur.WORDS
    unit = heur.length_unit(["not-cached", "tiny-mistral"])
    assert unit.name == "tokens (tiny-mistral tokenizer)"
    # Tokens differ from words where a word is several tokens (punctuation, digits, rare words) ...
    text = "Review: 12345 zyxwvut!"
    assert len(unit.tokenize(text)) > len(heur.WORDS.tokenize(text)) == 3
    # ... and so do a demo task's lengths; outputs are short either way.
    task = catalog.task("demo_sentiment")
    tokens, words = (heur.task_heuristics(task, u.tokenize, limit=40) for u in (unit, heur.WORDS))
    assert (
        tokens["input_tokens_mean"] > words["input_tokens_mean"]
        and tokens["total_tokens_p95"] > words["total_tokens_p95"]
    )
    assert {k: v for k, v in tokens.items() if "tokens" not in k} == {
        k: v for k, v in words.items() if "tokens" not in k
    }


@pytest.mark.unit
def test_heuristics_sample_is_seeded_and_random_not_the_head() -> None:
    from core.prompts import prompt_for
    from jobs.data import train_rows

    rows = list(range(1000))
    sample = heur.sample_rows(rows, 200)
    assert sample == heur.sample_rows(rows, 200) and len(set(sample)) == 200 and sample == sorted(sample)
    assert sample != rows[:200] and max(sample) > 800  # drawn from the whole split
    assert heur.sample_rows(rows[:50], 200) == rows[:50]
    task = load_catalog().task("demo_colors")
    prompts, _ = heur.task_examples(task, limit=50)
    assert prompts == heur.task_examples(task, limit=50)[0]  # the same rows every time
    assert prompts != [prompt_for(task, row) for row in train_rows(task, 50)]


@pytest.mark.unit
def test_tokenizer_is_downloaded_unless_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real base model's tokenizer: fetched from the Hub (tokenizer files only) when HF_HUB_OFFLINE is not set,
    looked up in the cache only when it is; nothing is downloaded here (from_pretrained is recorded)."""
    import transformers

    calls: list[tuple[str, bool]] = []

    class Tokenizer:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
            return list(text)

    def from_pretrained(source: str, local_files_only: bool = False, **kwargs: object) -> Tokenizer:
        calls.append((source, local_files_only))
        if local_files_only:
            raise OSError("not in the cache")
        return Tokenizer()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    hf_id = load_catalog().base_model("mistral-7b").hf_id
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    unit = heur.length_unit(["mistral-7b"])
    assert unit.name == "tokens (mistral-7b tokenizer)" and calls == [(hf_id, False)] and len(unit.tokenize("abc")) == 3
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert heur.length_unit(["mistral-7b"]) == heur.WORDS  # offline and not cached: words, labelled so
    assert calls[-1] == (hf_id, True)


@pytest.mark.unit
def test_cl100k_is_found_only_where_tiktoken_would_load_it_offline(
    no_cl100k: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    assert heur.cl100k_cache_file() is None and heur.study_unit() is None  # an empty cache
    # A file under tiktoken's cache name whose hash is not cl100k_base's: tiktoken would delete it and download.
    cached = no_cl100k / hashlib.sha1(heur.CL100K_URL.encode()).hexdigest()
    cached.write_bytes(b"aGVsbG8= 0\n")
    assert heur.cl100k_cache_file() is None and cached.is_file(), "looked at, never changed"
    monkeypatch.setattr(heur, "CL100K_SHA256", hashlib.sha256(cached.read_bytes()).hexdigest())
    assert heur.cl100k_cache_file() == cached
    # tiktoken's own order: TIKTOKEN_CACHE_DIR (empty turns the cache off), else DATA_GYM_CACHE_DIR.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert heur.cl100k_cache_file() is None
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(no_cl100k))
    assert heur.cl100k_cache_file() == cached


@pytest.mark.unit
def test_lengths_in_the_studys_cl100k_tokens_when_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the file cached, cl100k_base comes before any base model's tokenizer; the report names the unit. Building a
    real cl100k file is not possible offline (tiktoken checks its hash), so tiktoken's loader is stood in for."""
    import tiktoken
    import tiktoken.load

    class Encoding:
        def encode(self, text: str, disallowed_special: tuple[str, ...] = ("all",)) -> list[int]:
            assert disallowed_special == (), "special-token text in a dataset is counted, not refused"
            return list(range(len(text)))

    def no_download(blobpath: str) -> bytes:
        raise AssertionError(f"tried to download {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    monkeypatch.setattr(heur, "cl100k_cache_file", lambda: tmp_path / "cl100k")
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: Encoding() if name == "cl100k_base" else None)
    unit = heur.length_unit(["tiny-llama"])
    assert unit.name == heur.STUDY_UNIT and len(unit.tokenize("<|endoftext|> hi")) == 16
    assert heur.unit_note(unit.name) == "" and "cl100k_base" in heur.unit_note("tokens (tiny-llama tokenizer)")
    tasks = ["glue_sst2", "boolq", "gsm8k"]
    runs = study_runs(tasks, ["mistral-7b", "phi-2"])
    features = pd.DataFrame({name: [1.0, 2.0, 4.0] for name in heur.HEURISTICS}, index=pd.Index(tasks, name="task"))
    report.write_report(runs, tmp_path / "report", features=features, length_unit=unit.name)
    assert f"lengths in {heur.STUDY_UNIT}, ROUGE-L" in (tmp_path / "report" / "leaderboard.md").read_text()
    report.write_report(runs, tmp_path / "words", features=features, length_unit="words")
    assert (
        "lengths in words (the study counted tiktoken's cl100k_base tokens"
        in (tmp_path / "words" / "leaderboard.md").read_text()
    )
