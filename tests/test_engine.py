"""The batching engine on a real 4-bit tiny model: mixed-adapter batches equal requests served alone
(and PEFT), continuous batching, stop rules, sampling seeds, adapter tiers, loads off the decode
loop, bad adapters, fairness and back-pressure."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.catalog import load_catalog
from core.schemas import QuantizationSettings
from jobs.models import load_adapter, load_base_model, load_tokenizer
from serving.batching import BatchingEngine, build_engine
from serving.config import BatchingEngineConfig
from serving.detok import CompletionText, Detokenizer
from serving.engine import (
    AdapterLoadError,
    ContextTooLong,
    Delta,
    EngineError,
    EngineOverloaded,
    InvalidRequest,
    SamplingParams,
)
from serving.synthetic import random_adapter

BASE = "tiny-llama"
RANKS = [2, 4, 8, 16, 8, 4, 16, 2, 12, 6]  # 10 adapters of mixed ranks
PROMPTS = ["The movie was great and", "Colour of the sky:", "12 + 7 =", "Review: awful film. Sentiment:", "Hello"]
GREEDY = SamplingParams(max_tokens=12)

pytestmark = pytest.mark.unit  # each test takes well under 2 s on a CPU (the module's engine is shared)


def adapter_targets(index: int) -> list[str]:
    modules = list(load_catalog().base_model(BASE).all_linear_modules)
    return modules if index % 2 else ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    base = load_base_model(load_catalog().base_model(BASE), QuantizationSettings(), "cpu")
    for index, rank in enumerate(RANKS):
        random_adapter(base, root / f"a{index}", rank, adapter_targets(index), seed=index, strength=4.0)
    return root


def make_engine(adapter_dir: Path, **settings: Any) -> BatchingEngine:
    spec = load_catalog().base_model(BASE)

    def fetch(adapter: str) -> Path:
        path = adapter_dir / adapter
        if not path.exists():
            raise FileNotFoundError(f"no adapter {adapter}")
        return path

    return build_engine(spec, "4bit", "cpu", fetch, BatchingEngineConfig(**settings))


@pytest.fixture(scope="module")
def engine(adapter_dir: Path) -> Iterator[BatchingEngine]:
    engine = make_engine(adapter_dir, max_batch_size=64)
    yield engine
    engine.shutdown()


def ids(engine: BatchingEngine, prompt: str) -> list[int]:
    return engine.tokenizer(prompt)["input_ids"]


async def collect(engine: BatchingEngine, prompt: str, adapter: str | None,
                  params: SamplingParams = GREEDY) -> list[Delta]:
    return [delta async for delta in engine.generate(ids(engine, prompt), adapter, params)]


def tokens(deltas: list[Delta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


def text(deltas: list[Delta]) -> str:
    return "".join(delta.text for delta in deltas)


def run(coro: Any, timeout: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# --------------------------------------------------------------------------- correctness of mixed batches


def test_mixed_batch_equals_each_request_served_alone(engine: BatchingEngine) -> None:
    jobs = [(prompt, f"a{i}") for i in range(len(RANKS)) for prompt in PROMPTS[:3]] + [(p, None) for p in PROMPTS]

    async def alone() -> list[list[Delta]]:
        return [await collect(engine, prompt, adapter) for prompt, adapter in jobs]

    async def together() -> list[list[Delta]]:
        return list(await asyncio.gather(*(collect(engine, prompt, adapter) for prompt, adapter in jobs)))

    single = run(alone())
    engine.peak_adapters = engine.peak_rows = 0
    mixed = run(together())
    assert engine.peak_adapters >= 8 and engine.peak_rows >= 20  # the requests really shared forward passes
    for (prompt, adapter), a, b in zip(jobs, single, mixed):
        assert tokens(b) == tokens(a), (prompt, adapter)
        assert text(b) == text(a)
        assert b[-1].finish_reason in ("length", "stop") and b[-1].completion_tokens == len(tokens(b))
    outputs = {tuple(tokens(out)) for (prompt, _), out in zip(jobs, single) if prompt == PROMPTS[0]}
    assert len(outputs) == len(RANKS) + 1  # every adapter (and the base) answers differently: adapters are applied


def test_engine_output_equals_peft(engine: BatchingEngine, adapter_dir: Path) -> None:
    spec = load_catalog().base_model(BASE)
    prompt_ids = ids(engine, PROMPTS[3])
    for name in ("a1", "a3", "a8"):  # all-linear rank 4, all-linear rank 16, q/v rank 12
        model = load_adapter(load_base_model(spec, QuantizationSettings(), "cpu"), adapter_dir / name).eval()
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([prompt_ids]),
                                 attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                 max_new_tokens=GREEDY.max_tokens, do_sample=False)
        assert tokens(run(collect(engine, PROMPTS[3], name))) == out[0, len(prompt_ids):].tolist(), name


def test_continuous_batching_requests_join_and_leave_between_steps(engine: BatchingEngine) -> None:
    async def staggered() -> tuple[list[list[Delta]], list[list[Delta]]]:
        long = [asyncio.create_task(collect(engine, PROMPTS[0], f"a{i}",
                                            SamplingParams(max_tokens=40))) for i in range(3)]
        while engine.steps == steps_before:  # the long requests are decoding
            await asyncio.sleep(0.001)
        short = await asyncio.gather(*(collect(engine, PROMPTS[2], f"a{i}",
                                               SamplingParams(max_tokens=4)) for i in range(3, 7)))
        assert not all(task.done() for task in long)  # the short ones joined and left while the long ones ran
        return list(short), list(await asyncio.gather(*long))

    steps_before = engine.steps
    short, long = run(staggered())
    for i, out in enumerate(long):
        assert tokens(out) == tokens(run(collect(engine, PROMPTS[0], f"a{i}", SamplingParams(max_tokens=40))))
    for i, out in zip(range(3, 7), short):
        assert tokens(out) == tokens(run(collect(engine, PROMPTS[2], f"a{i}", SamplingParams(max_tokens=4))))


# --------------------------------------------------------------------------- stop rules and sampling


def test_stop_strings_max_tokens_and_streaming(engine: BatchingEngine) -> None:
    full = run(collect(engine, PROMPTS[1], "a2", SamplingParams(max_tokens=20)))
    whole = text(full)
    # streamed in pieces
    assert full[-1].finish_reason == "length" and full[-1].completion_tokens == 20 and len(full) > 2
    stop = whole[len(whole) // 2: len(whole) // 2 + 3]
    cut = run(collect(engine, PROMPTS[1], "a2", SamplingParams(max_tokens=20, stop=(stop,))))
    assert cut[-1].finish_reason == "stop"
    assert text(cut) == whole[: whole.find(stop)]  # the stop string and what follows never reach the client
    assert all(stop not in delta.text for delta in cut)


def test_an_unstreamed_request_gets_its_whole_completion_in_one_delta(engine: BatchingEngine) -> None:
    streamed = run(collect(engine, PROMPTS[1], "a3"))
    whole = run(collect(engine, PROMPTS[1], "a3", SamplingParams(max_tokens=GREEDY.max_tokens, stream=False)))
    assert len(streamed) > 1 and len(whole) == 1
    assert tokens(whole) == tokens(streamed) and whole[0].text == "".join(delta.text for delta in streamed)
    assert whole[0].finish_reason == streamed[-1].finish_reason


def test_seeded_sampling_is_reproducible(engine: BatchingEngine) -> None:
    def sample(seed: int) -> list[int]:
        return tokens(run(collect(engine, PROMPTS[0], "a5",
                                  SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, seed=seed))))

    assert sample(7) == sample(7)
    assert len({tuple(sample(seed)) for seed in (1, 2, 3, 4)}) > 1


def test_bad_requests_get_clear_errors(engine: BatchingEngine) -> None:
    with pytest.raises(ContextTooLong, match="exceeds the model's context of 512"):
        run(collect(engine, PROMPTS[0], None, SamplingParams(max_tokens=600)))
    with pytest.raises(InvalidRequest, match="empty"):
        run(_collect_ids(engine, [], None))
    with pytest.raises(InvalidRequest, match="max_tokens"):
        run(collect(engine, PROMPTS[0], None, SamplingParams(max_tokens=0)))


async def _collect_ids(engine: BatchingEngine, prompt_ids: list[int], adapter: str | None) -> list[Delta]:
    return [delta async for delta in engine.generate(prompt_ids, adapter, GREEDY)]


# --------------------------------------------------------------------- detokenization (DecodeStream) and stop strings


TRICKY = "Café: 日本語 🙂 ok. Answer: positive"  # multi-byte characters split over several byte-level tokens


def tricky_ids() -> tuple[Any, list[int]]:
    tokenizer = load_tokenizer(load_catalog().base_model(BASE))
    return tokenizer, tokenizer(TRICKY, add_special_tokens=False)["input_ids"]


def test_decode_stream_gives_the_window_decoders_text_on_tricky_input() -> None:
    tokenizer, prompt = tricky_ids()
    fast, window = Detokenizer(tokenizer), Detokenizer(tokenizer, use_decode_stream=False)
    assert fast.stream is not None and window.stream is None  # the tiny tokenizers get tokenizers' DecodeStream
    pieces = [fast.step(token) for token in prompt]
    assert pieces == [window.step(token) for token in prompt]  # the same piece at the same token
    assert "".join(pieces) == TRICKY and not any("\ufffd" in piece for piece in pieces)  # never half a character
    assert pieces.count("") >= 5  # the multi-byte characters really were split across tokens
    rng = random.Random(0)
    for _ in range(100):  # any ids, special tokens included
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        fast, window = Detokenizer(tokenizer), Detokenizer(tokenizer, use_decode_stream=False)
        assert [fast.step(token) for token in ids] == [window.step(token) for token in ids], ids
        assert fast.held() == window.held()
    held = Detokenizer(tokenizer)
    # EOS mid-character
    assert [held.step(token) for token in prompt[:3]] == ["C", "af", ""] and held.held() == "\ufffd"


@pytest.mark.parametrize("stop", ["r: pos", "本語", "🙂 o"])
def test_a_stop_string_split_across_tokens_never_reaches_the_stream(stop: str) -> None:
    tokenizer, prompt = tricky_ids()
    detok, output, streamed = Detokenizer(tokenizer), CompletionText((stop,)), []
    for token in prompt:  # as the engine does per token
        output.extend(detok.step(token))
        if output.cut_at_stop():
            streamed.append(output.take_rest())
            break
        streamed.append(output.take_ready())
    assert "".join(streamed) == TRICKY[: TRICKY.find(stop)]
    assert not any(stop[:2] in piece for piece in streamed)  # not even the stop string's start was sent ahead


# ---------------------------------------------------------------------- adapters: tiers, bad ones, loads off the loop


def test_bad_adapters_fail_only_their_own_requests(engine: BatchingEngine, adapter_dir: Path, tmp_path: Path) -> None:
    corrupt = adapter_dir / "corrupt"
    corrupt.mkdir(exist_ok=True)
    (corrupt / "adapter_config.json").write_text((adapter_dir / "a0" / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    big = adapter_dir / "rank-too-big"
    random_adapter(engine.model, big, 128, ["q_proj"], seed=1)
    pickle = adapter_dir / "pickle"
    pickle.mkdir(exist_ok=True)
    (pickle / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (pickle / "adapter_model.bin").write_bytes(b"not loaded")
    foreign = adapter_dir / "other-base"  # a phi adapter: layer names this llama does not have
    random_adapter(load_base_model(load_catalog().base_model("tiny-phi"), QuantizationSettings(load_in_4bit=False),
                                   "cpu"),
                   foreign, 4, ["fc1"], seed=2)

    async def mixed() -> list[Any]:
        names = ["corrupt", "missing", "rank-too-big", "pickle", "other-base", "a0", "a1"]
        return list(await asyncio.gather(*(collect(engine, PROMPTS[0], name) for name in names),
                                         return_exceptions=True))

    results = run(mixed())
    expected = ["unreadable adapter", "could not be fetched", "rank 128 is outside", "pickle .bin adapters are refused",
                "not a served layer"]
    for result, message in zip(results, expected):
        assert isinstance(result, AdapterLoadError) and message in str(result), result
    assert tokens(results[5]) == tokens(run(collect(engine, PROMPTS[0], "a0")))
    assert tokens(results[6]) == tokens(run(collect(engine, PROMPTS[0], "a1")))
    engine.check_health()


def test_cold_adapter_loads_off_the_decode_loop(adapter_dir: Path) -> None:
    gate = threading.Event()
    fetched: list[str] = []
    spec = load_catalog().base_model(BASE)

    def slow_fetch(adapter: str) -> Path:
        fetched.append(adapter)
        if adapter == "a9":
            assert gate.wait(60), "test never released the cold adapter"
        return adapter_dir / adapter

    engine = build_engine(spec, "4bit", "cpu", slow_fetch, BatchingEngineConfig())
    try:
        async def scenario() -> tuple[list[Delta], list[Delta]]:
            cold = asyncio.create_task(collect(engine, PROMPTS[0], "a9"))
            await asyncio.sleep(0.05)
            hot = await collect(engine, PROMPTS[0], "a0", SamplingParams(max_tokens=30))  # decodes while a9 is loading
            assert not cold.done()
            gate.set()
            return hot, await cold

        hot, cold = run(scenario(), timeout=90)
        assert len(tokens(hot)) == 30 and len(tokens(cold)) == GREEDY.max_tokens
    finally:
        gate.set()
        engine.shutdown()


def test_tiers_evict_least_recently_used_and_keep_pinned(adapter_dir: Path) -> None:
    engine = make_engine(adapter_dir, device_adapter_slots=2, host_adapter_slots=3, pinned_adapters=["a0"],
                         max_batch_size=8)
    reference = make_engine(adapter_dir)  # room for every adapter
    try:
        order = ["a1", "a2", "a3", "a4", "a1", "a0", "a5", "a2", "a0"]
        expected = {name: tokens(run(collect(reference, PROMPTS[0], name))) for name in set(order)}

        async def all_at_once() -> list[list[Delta]]:
            return list(await asyncio.gather(*(collect(engine, PROMPTS[0], name) for name in order)))

        for name, out in zip(order, run(all_at_once())):  # more adapters than slots in one burst: they take turns
            assert tokens(out) == expected[name], name
        for name in order:  # one at a time: evictions and reloads
            assert tokens(run(collect(engine, PROMPTS[0], name))) == expected[name], name
        stats = engine.stats()
        assert stats["a0"]["loads"] == 1  # pinned: never evicted from host memory
        assert stats["a1"]["loads"] >= 2  # evicted from the 3-adapter host tier and fetched again
        assert len(engine.held_adapters()) <= 2 and "a0" in engine.held_adapters()
    finally:
        engine.shutdown()
        reference.shutdown()


# --------------------------------------------------------------------------- fairness and back-pressure


def test_a_flood_for_one_adapter_does_not_starve_another(adapter_dir: Path) -> None:
    engine = make_engine(adapter_dir, max_batch_size=4, max_queued_requests=200)
    finished: list[str] = []
    try:
        async def one(adapter: str) -> None:
            await collect(engine, PROMPTS[0], adapter, SamplingParams(max_tokens=8))
            finished.append(adapter)

        async def scenario() -> None:
            flood = [asyncio.create_task(one("a0")) for _ in range(40)]
            while engine.steps == 0:
                await asyncio.sleep(0.001)
            await one("a1")
            await asyncio.gather(*flood)

        run(scenario())
        assert finished.index("a1") <= 8  # waited for at most about one batch of the flood, not all 40
    finally:
        engine.shutdown()


def test_admission_keeps_the_padded_kv_cache_within_its_token_budget(adapter_dir: Path) -> None:
    """M4: every row of the batch's KV cache is padded to the widest, so admission counts rows x the width the cache
    can grow to, not rows and prompt tokens: one long request among short ones keeps the cache within
    `max_batch_tokens` (the short ones wait for it, or it for them), and every request is still answered in full."""
    budget = 240
    engine = make_engine(adapter_dir, max_batch_size=8, max_batch_tokens=budget)
    cells: list[int] = []
    decode = engine._decode

    def watched() -> None:  # what the cache holds before each decode step: rows x columns
        assert engine.batch is not None
        cells.append(len(engine.rows) * int(engine.batch.mask.shape[1]))
        decode()

    engine._decode = watched  # type: ignore[method-assign]  # the decode loop looks it up at each step
    try:
        long_ids = ids(engine, "a long review of a film " * 6)
        assert 40 < len(long_ids) < 100

        async def long() -> list[Delta]:
            return [delta async for delta in engine.generate(long_ids, "a7", SamplingParams(max_tokens=40))]

        async def mixed() -> list[list[Delta]]:  # one long request and six short ones, all at once
            short = [collect(engine, PROMPTS[i % 5], f"a{i}", SamplingParams(max_tokens=8)) for i in range(6)]
            return list(await asyncio.gather(long(), *short))

        answers = run(mixed())
        assert [len(tokens(answer)) for answer in answers] == [40] + [8] * 6
        assert cells and max(cells) <= budget, max(cells)
    finally:
        engine.shutdown()


def test_a_full_queue_answers_overloaded_and_recovers(adapter_dir: Path) -> None:
    engine = make_engine(adapter_dir, max_batch_size=2, max_queued_requests=3)
    try:
        async def burst() -> list[Any]:
            return list(await asyncio.gather(*(collect(engine, PROMPTS[0], "a0",
                                                       SamplingParams(max_tokens=6)) for _ in range(20)),
                                             return_exceptions=True))

        results = run(burst())
        overloaded = [r for r in results if isinstance(r, EngineOverloaded)]
        served = [r for r in results if isinstance(r, list)]
        assert overloaded and served and len(overloaded) + len(served) == 20
        assert all(r.retry_after_s > 0 and "max_queued_requests" in str(r) for r in overloaded)
        assert engine.pending == 0
        assert len(tokens(run(collect(engine, PROMPTS[0], "a0")))) == GREEDY.max_tokens  # serves again once drained
    finally:
        engine.shutdown()


def test_a_client_that_goes_away_frees_its_row(engine: BatchingEngine) -> None:
    """What `held_resources` (the soak's leak check) reports: the request's row, slot and KV cache while it runs, all
    freed once its client went away."""
    async def abandon() -> dict[str, float]:
        stream = engine.generate(ids(engine, PROMPTS[0]), "a3", SamplingParams(max_tokens=200))
        async for _ in stream:
            break
        held = engine.held_resources()
        await stream.aclose()
        return held

    running = run(abandon())
    assert running["rows"] >= 1 and running["slots_held"] >= 1 and running["kv_bytes"] > 0, running
    for _ in range(200):
        if not engine.rows:
            break
        run(asyncio.sleep(0.01))
    assert engine.rows == [] and engine.pending == 0
    assert engine.held_resources() == {"rows": 0, "pending": 0, "slots_held": 0, "kv_bytes": 0}


def test_a_failing_forward_pass_fails_only_its_requests(adapter_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(adapter_dir)
    try:
        forward = engine.model.forward

        def flaky(*args: Any, **kwargs: Any) -> Any:
            if kwargs["input_ids"].shape[1] == 7:  # a prefill of exactly 7 prompt tokens blows up
                raise RuntimeError("injected kernel failure")
            return forward(*args, **kwargs)

        monkeypatch.setattr(engine.model, "forward", flaky)
        with pytest.raises(EngineError, match="generation failed: RuntimeError: injected kernel failure"):
            run(_collect_ids(engine, list(range(10, 17)), "a0"))
        engine.check_health()
        assert len(tokens(run(collect(engine, PROMPTS[0], "a0")))) == GREEDY.max_tokens
    finally:
        engine.shutdown()


# --------------------------------------------------------------------------- LoRA math: side by side and gathered


class _OneLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 5)


@pytest.mark.parametrize("slots", [
    [1, 2, 0, 3, 1],  # 3 adapters and a base row: side by side, each at its own rank
    [4, 4, 4],  # one adapter for every row: no mask
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 2],  # 9 adapters and a base row
])
@pytest.mark.parametrize("tokens", [0, 3])  # a decode step [rows, in] and a prefill [rows, T, in]
@pytest.mark.parametrize("gather", [False, True])  # side by side, each at its own rank; each row gathers its own
def test_every_row_gets_exactly_its_own_adapter(slots: list[int], tokens: int, gather: bool) -> None:
    from serving.lora import AdapterWeights, LoraSlots

    torch.manual_seed(0)
    model = _OneLinear()
    lora = LoraSlots(model, ["proj"], slots=10, max_rank=4, dtype=torch.float32)
    weights = {slot: (torch.randn(1 + slot % 4, 6), torch.randn(5, 1 + slot % 4)) for slot in range(1, 10)}  # ranks 1-4
    for slot, (a, b) in weights.items():
        lora.load(slot, AdapterWeights(rank=a.shape[0], modules={"proj": (a, b)}))
    x = torch.randn(len(slots), *([tokens] if tokens else []), 6)
    lora.set_batch(slots, max(tokens, 1), gather=gather)
    with torch.inference_mode():
        got = model.proj(x)
        base = lora.layers["proj"].base(x)
    for row, slot in enumerate(slots):
        expected = base[row] + ((x[row] @ weights[slot][0].T) @ weights[slot][1].T if slot else 0)
        torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-5)


def test_decode_steps_lay_a_few_adapters_side_by_side_and_prefills_gather_from_a_few_more() -> None:
    from serving.lora import uses_gather

    assert not uses_gather([8] * 8, tokens_per_row=1)  # a decode step: 8 rank-8 adapters side by side
    assert uses_gather([8] * 31, tokens_per_row=1)
    assert uses_gather([8] * 8, tokens_per_row=30)  # a prefill of 30-token prompts gathers
    assert not uses_gather([4, 8], tokens_per_row=30)
    assert not uses_gather([64], tokens_per_row=500)  # one adapter is never gathered


def test_residency_names_each_adapters_tier(engine: BatchingEngine) -> None:
    run(collect(engine, PROMPTS[0], "a7"))
    held = engine.residency()
    assert held["a7"] == "device" and set(held.values()) <= {"device", "host"}
    assert set(engine.held_adapters()) == {adapter for adapter, tier in held.items() if tier == "device"}
