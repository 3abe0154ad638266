"""The fast path's pure parts: LoRA arithmetic on small hand-made adapters, and the fold
protocol (which LoRA each request gets, requests never straddling a fold) against a fake engine.
The real engine's folded outputs are compared with its LoRA path in tests/test_adapters_serving.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tuneloop.server.domain import SamplingSpec
from tuneloop.server.engine import RESUMED_PRIORITY, EngineDelta, EngineRequest, LoadedAdapter
from tuneloop.server.fast_path import FastPath
from tuneloop.server.lora_algebra import NotFoldable, read_lora, weight_deltas, write_difference
from tuneloop.server.vllm_fold import FoldWorkerExtension

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")


def write_lora(path: Path, rank: int, seed: int, modules: tuple[str, ...] = MODULES, **config: object) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in modules:
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, 6, generator=g)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(5, rank, generator=g)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
    cfg.update(config)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def test_a_loras_update_is_scale_times_b_a(tmp_path: Path) -> None:
    lora = read_lora(write_lora(tmp_path / "a", rank=2, seed=1))
    assert lora.scale == 2.0  # alpha / r
    a, b = lora.factors[MODULES[0]]
    assert torch.allclose(weight_deltas(lora)[f"{MODULES[0]}.weight"], 2.0 * b @ a)
    rs = read_lora(write_lora(tmp_path / "rs", rank=4, seed=1, use_rslora=True))
    assert rs.scale == pytest.approx(8 / 2)  # alpha / sqrt(r)


def test_the_difference_adapter_turns_one_folded_version_into_another_or_the_base(tmp_path: Path) -> None:
    v = read_lora(write_lora(tmp_path / "v", rank=2, seed=1))
    # C adapts one module V does not, and skips one V adapts: zero factors fill in.
    c = read_lora(write_lora(tmp_path / "c", rank=3, seed=2, modules=(MODULES[0], "model.layers.0.mlp.up_proj")))
    assert write_difference(c, v, tmp_path / "c-v") == 5
    diff = weight_deltas(read_lora(tmp_path / "c-v"))
    dv, dc = weight_deltas(v), weight_deltas(c)
    for name in set(dv) | set(dc):
        want = dc.get(name, torch.zeros(5, 6)) - dv.get(name, torch.zeros(5, 6))
        assert torch.allclose(diff[name], want, atol=1e-5), name
    assert write_difference(None, v, tmp_path / "base-v") == 2
    back = weight_deltas(read_lora(tmp_path / "base-v"))
    assert all(torch.allclose(back[n], -dv[n], atol=1e-5) for n in dv)


def test_adapters_whose_update_is_not_b_a_are_not_folded(tmp_path: Path) -> None:
    with pytest.raises(NotFoldable, match="DoRA"):
        read_lora(write_lora(tmp_path / "dora", rank=2, seed=1, use_dora=True))
    with pytest.raises(NotFoldable, match="rank_pattern"):
        read_lora(write_lora(tmp_path / "rp", rank=2, seed=1, rank_pattern={"q_proj": 4}))


# --------------------------------------------------------------------------- the fold protocol
class FoldingFake:
    """Records which LoRA each request ran with and the weights it ran on. Each request emits
    `max_tokens` tokens, token = 100 + its output position, one at a time while the token budget
    allows (None: unlimited); an aborted request ends with finish reason "abort", as vLLM's."""

    max_model_len = 1024

    def __init__(self) -> None:
        self.weights = ""  # adapter path folded in, "" for the bare base
        self.ran: list[tuple[str, str | None, str]] = []  # (request id, adapter key, weights at start)
        self.requests: list[EngineRequest] = []  # as the engine received them
        self.budget: int | None = None  # tokens any request may still emit before waiting
        self.budgets: dict[str, int | None] = {}  # the same for one request (continuations included)
        self.changed = asyncio.Event()  # the budget grew, or a request was aborted
        self.folds: list[str | None] = []
        self.reloading = asyncio.Event()  # a reload may finish (tests clear it to hold one)
        self.reloading.set()
        self.running: set[str] = set()  # request ids in the engine
        self.aborted: set[str] = set()
        self.partial: set[int] = set()  # output positions whose token ends mid-character
        self.ids: dict[str, set[int]] = {}  # LoRA name -> the int ids requests carried under it

    def allow(self, tokens: int | None, request_id: str | None = None) -> None:
        if request_id is None:
            self.budget = tokens
        else:
            self.budgets[request_id] = tokens
        self.changed.set()

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return ""

    def tokenize(self, text: str) -> list[int]:
        return [1]

    def resumable(self, request: EngineRequest) -> bool:
        return request.sampling.n == 1 and not request.sampling.stop

    def ends_a_character(self, output_token_ids: list[int]) -> bool:
        return not output_token_ids or output_token_ids[-1] - 100 not in self.partial

    async def _may_emit(self, request_id: str) -> bool:
        key = request_id.split("~")[0]
        while request_id not in self.aborted:
            budget = self.budgets[key] if key in self.budgets else self.budget
            if budget is None or budget > 0:
                if budget is not None and key in self.budgets:
                    self.budgets[key] = budget - 1
                elif budget is not None:
                    self.budget = budget - 1
                return True
            self.changed.clear()
            await self.changed.wait()
        return False

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineDelta, None]:
        start = self.weights
        self.requests.append(request)
        if request.adapter is not None:
            self.ids.setdefault(request.adapter.key, set()).add(request.adapter.int_id)
        rid = request.request_id
        self.running.add(rid)
        try:
            n = request.sampling.max_tokens
            for i in range(n):
                if not await self._may_emit(rid):
                    yield EngineDelta(0, "", (), None, "abort", "", None)
                    return
                assert self.weights == start, "a fold changed the weights under a running request"
                if i == 0:
                    self.ran.append((rid, request.adapter.key if request.adapter else None, start))
                token = 100 + request.output_offset + i
                yield EngineDelta(0, "x", (token,), None, "length" if i == n - 1 else None, "", None)
        finally:
            self.running.discard(rid)

    async def fold_weights(self, adapter_path: str | None) -> dict[str, object]:
        assert not self.running, "folded while a request ran"
        await self.reloading.wait()
        self.folds.append(adapter_path)
        self.weights = adapter_path or ""
        return {}

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)
        self.running.discard(request_id)  # the engine drops it before anything sent after the abort
        self.changed.set()

    async def add_adapter(self, adapter: LoadedAdapter) -> None: ...
    async def remove_adapter(self, adapter: LoadedAdapter) -> None: ...
    async def check_health(self) -> None: ...
    def shutdown(self) -> None: ...


async def _run(fp: FastPath, rid: str, adapter: LoadedAdapter | None) -> None:
    req = EngineRequest(rid, [1], SamplingSpec(max_tokens=1, temperature=0.0), adapter)
    async for _ in fp.generate(req):
        pass


async def test_each_request_gets_the_lora_that_gives_its_version_on_the_folded_weights(tmp_path: Path) -> None:
    fake = FoldingFake()
    fp = FastPath(fake, max_lora_rank=16)
    v = LoadedAdapter("a@v1", 1, str(write_lora(tmp_path / "v1", rank=4, seed=1)))
    c = LoadedAdapter("a@v2", 2, str(write_lora(tmp_path / "v2", rank=8, seed=2)))
    await _run(fp, "before", v)
    fp.serve_folded(v)
    await fp.settled()
    assert fp.folded == "a@v1" and fake.folds == [v.path]
    await _run(fp, "v", v)
    await _run(fp, "base", None)
    await _run(fp, "c", c)
    got = {rid: (key, weights) for rid, key, weights in fake.ran}
    assert got["before"] == ("a@v1", "")  # LoRA path on the bare weights
    assert got["v"] == (None, v.path)  # the folded version runs with no LoRA
    assert got["base"] == ("base~a@v1", v.path)  # minus V
    assert got["c"] == ("a@v2~a@v1", v.path)  # plus C minus V
    fp.serve_folded(None)
    await fp.settled()
    assert fake.folds == [v.path, None]
    await _run(fp, "after", v)
    assert fake.ran[-1] == ("after", "a@v1", "")


async def test_a_fold_waits_for_requests_it_cannot_preempt_and_holds_new_ones_until_it_is_done(tmp_path: Path) -> None:
    fake = FoldingFake()
    fp = FastPath(fake, max_lora_rank=16)
    v = LoadedAdapter("a@v1", 1, str(write_lora(tmp_path / "v1", rank=4, seed=1)))
    fake.allow(0)
    # Stop strings: the engine holds back text that may begin one, so it cannot be continued.
    req = EngineRequest("running", [1], SamplingSpec(max_tokens=1, temperature=0.0, stop=("\n",)), v)
    running = asyncio.create_task(_consume(fp, req))
    while not fake.running:
        await asyncio.sleep(0)
    fp.serve_folded(v)
    while not fp.holding:  # the adapter's files are read first, requests still flowing
        await asyncio.sleep(0.001)
    waiting = asyncio.create_task(_run(fp, "waiting", v))
    for _ in range(20):
        await asyncio.sleep(0)
    assert fake.folds == [] and fake.running == {"running"}  # the fold waits; the new request is held
    fake.allow(None)
    await asyncio.gather(running, waiting)
    await fp.settled()
    assert [(rid, key, w) for rid, key, w in fake.ran] == [("running", "a@v1", ""), ("waiting", None, v.path)]
    assert fp.preempted == 0 and not fake.aborted


async def _consume(fp: FastPath, request: EngineRequest) -> list[EngineDelta]:
    return [d async for d in fp.generate(request)]


async def test_a_fold_preempts_a_running_request_and_continues_it_on_the_new_weights(tmp_path: Path) -> None:
    fake = FoldingFake()
    fp = FastPath(fake, max_lora_rank=16)
    v = LoadedAdapter("a@v1", 1, str(write_lora(tmp_path / "v1", rank=4, seed=1)))
    fake.allow(2)
    req = EngineRequest("long", [1, 2], SamplingSpec(max_tokens=5, temperature=0.7, seed=7), v)
    task = asyncio.create_task(_consume(fp, req))
    while fake.budget:  # two tokens out, the third waits
        await asyncio.sleep(0)
    fp.serve_folded(v, at_once=True)
    await asyncio.wait_for(fp.settled(), 5)  # not waiting for the request to finish
    assert fake.folds == [v.path] and fake.aborted == {"long"} and fp.preempted == 1
    fake.allow(None)
    deltas = await task
    # The caller sees one stream: positions continue where the cut was, and it ends once.
    assert [t for d in deltas for t in d.token_ids] == [100, 101, 102, 103, 104]
    assert [d.finish_reason for d in deltas] == [None] * 4 + ["length"]
    first, resumed = fake.requests
    assert (first.request_id, first.adapter) == ("long", v)
    assert resumed.request_id == "long~1" and resumed.adapter is None  # v1 now in the weights
    assert resumed.prompt_token_ids == [1, 2, 100, 101] and resumed.output_offset == 2
    assert first.priority == 0 and resumed.priority == RESUMED_PRIORITY  # new prompts are admitted first
    assert resumed.sampling == SamplingSpec(max_tokens=3, temperature=0.7, seed=7)


async def test_requests_held_by_a_fold_reach_the_engine_before_its_continuations(tmp_path: Path) -> None:
    # Theirs are short prefills that give first tokens; a continuation's reply is under way.
    fake = FoldingFake()
    fp = FastPath(fake, max_lora_rank=16)
    v = LoadedAdapter("a@v1", 1, str(write_lora(tmp_path / "v1", rank=4, seed=1)))
    fake.allow(1)
    long = asyncio.create_task(_consume(fp, EngineRequest("long", [1], SamplingSpec(max_tokens=3), v)))
    while fake.budget:
        await asyncio.sleep(0)
    fake.reloading.clear()
    fp.serve_folded(v, at_once=True)
    while "long" not in fake.aborted:
        await asyncio.sleep(0.001)
    fresh = asyncio.create_task(_consume(fp, EngineRequest("fresh", [2], SamplingSpec(max_tokens=1), v)))
    for _ in range(20):
        await asyncio.sleep(0)
    assert fp.holding and [r.request_id for r in fake.requests] == ["long"]
    fake.allow(None)
    fake.reloading.set()
    await asyncio.gather(long, fresh)
    assert [r.request_id for r in fake.requests] == ["long", "fresh", "long~1"]


async def test_a_request_mid_character_is_cut_at_its_next_token(tmp_path: Path) -> None:
    fake = FoldingFake()
    fake.partial = {1}  # the second token holds the first bytes of a character
    fp = FastPath(fake, max_lora_rank=16)
    v = LoadedAdapter("a@v1", 1, str(write_lora(tmp_path / "v1", rank=4, seed=1)))
    c = LoadedAdapter("a@v2", 2, str(write_lora(tmp_path / "v2", rank=4, seed=2)))
    fake.allow(2)
    task = asyncio.create_task(_consume(fp, EngineRequest("r", [1], SamplingSpec(max_tokens=4), c)))
    while fake.budget:
        await asyncio.sleep(0)
    fp.serve_folded(v, at_once=True)
    while not fp.holding:
        await asyncio.sleep(0.001)
    for _ in range(20):
        await asyncio.sleep(0)
    assert fake.folds == [] and not fake.aborted  # not cut inside the character
    fake.allow(1)
    await asyncio.wait_for(fp.settled(), 5)
    assert fake.folds == [v.path] and fake.aborted == {"r"}
    fake.allow(None)
    deltas = await task
    assert [t for d in deltas for t in d.token_ids] == [100, 101, 102, 103]
    assert fake.requests[1].prompt_token_ids == [1, 100, 101, 102]
    assert fake.requests[1].adapter is not None and fake.requests[1].adapter.key == "a@v2~a@v1"


async def test_requests_on_the_weights_a_fold_replaces_finish_on_them_while_others_flow(tmp_path: Path) -> None:
    # The bare base runs with no LoRA before v1 is folded and would need one after: it is not
    # preempted (its continuation would re-read its prefix through a LoRA) but drained, and new
    # base requests wait for the fold; v1's requests flow meanwhile and are preempted at the reload.
    fake = FoldingFake()
    fp = FastPath(fake, max_lora_rank=16)
    v = LoadedAdapter("a@v1", 1, str(write_lora(tmp_path / "v1", rank=4, seed=1)))
    fake.allow(1, "old")
    old = asyncio.create_task(_consume(fp, EngineRequest("old", [1], SamplingSpec(max_tokens=3), None)))
    while fake.budgets["old"]:
        await asyncio.sleep(0)
    fp.serve_folded(v, at_once=True)
    while not fp.draining:
        await asyncio.sleep(0.001)
    fake.allow(2, "new")  # the new version's request gets its first tokens during the drain
    new = asyncio.create_task(_consume(fp, EngineRequest("new", [2], SamplingSpec(max_tokens=4), v)))
    held = asyncio.create_task(_consume(fp, EngineRequest("held", [3], SamplingSpec(max_tokens=1), None)))
    while fake.budgets["new"]:
        await asyncio.sleep(0)
    for _ in range(20):
        await asyncio.sleep(0)
    assert [r.request_id for r in fake.requests] == ["old", "new"] and fake.folds == []
    assert not fp.holding and not fake.aborted
    fake.allow(None, "old")  # "old" finishes on the bare base: the drain is over
    await asyncio.wait_for(fp.settled(), 5)
    assert fake.folds == [v.path] and fake.aborted == {"new"}
    fake.allow(None, "new")
    got = {
        name: [t for d in await task for t in d.token_ids]
        for name, task in (("old", old), ("new", new), ("held", held))
    }
    assert got == {"old": [100, 101, 102], "new": [100, 101, 102, 103], "held": [100]}
    runs = {r.request_id: r for r in fake.requests}
    assert runs["old"].adapter is None and runs["new"].adapter == v  # before the fold
    assert runs["new~1"].adapter is None and runs["new~1"].prompt_token_ids == [2, 100, 101]  # v1 folded now
    assert runs["held"].adapter is not None and runs["held"].adapter.key == "base~a@v1"


async def test_requests_flow_through_lora_during_the_settle_and_a_replaced_version_is_never_folded(
    tmp_path: Path,
) -> None:
    fake = FoldingFake()
    fp = FastPath(fake, max_lora_rank=16, settle_s=3600.0)
    v1 = LoadedAdapter("a@v1", 1, str(write_lora(tmp_path / "v1", rank=4, seed=1)))
    v2 = LoadedAdapter("a@v2", 2, str(write_lora(tmp_path / "v2", rank=4, seed=2)))
    fp.serve_folded(v1)
    await _run(fp, "settling", v1)  # not held: served through LoRA on the unchanged weights
    assert fake.ran[-1] == ("settling", "a@v1", "") and not fp.holding and fake.folds == []
    fp.serve_folded(v2)  # v1 replaced within its settle (a newer publish, a rollback)
    fp.serve_folded(v2, at_once=True)  # the same version, folded now
    await asyncio.wait_for(fp.settled(), 30)
    assert fake.folds == [v2.path] and fp.folded == "a@v2"
    await _run(fp, "folded", v2)
    assert fake.ran[-1] == ("folded", None, v2.path)


async def test_requests_released_together_share_one_difference_lora_per_version(tmp_path: Path) -> None:
    # vLLM keys a batch's LoRAs by name: two ids under one name in one batch leave one of them
    # out of the active slots, and the engine dies on the next step.
    fake = FoldingFake()
    fp = FastPath(fake, max_lora_rank=16)
    v = LoadedAdapter("a@v1", 1, str(write_lora(tmp_path / "v1", rank=4, seed=1)))
    c = LoadedAdapter("a@v2", 2, str(write_lora(tmp_path / "v2", rank=4, seed=2)))
    fp.serve_folded(v)
    await fp.settled()
    await asyncio.gather(*(_run(fp, f"r{i}", (None, c)[i % 2]) for i in range(16)))
    assert fake.ids == {"base~a@v1": fake.ids["base~a@v1"], "a@v2~a@v1": fake.ids["a@v2~a@v1"]}
    assert all(len(ids) == 1 for ids in fake.ids.values()), fake.ids
    assert len(list(fp._dir.iterdir())) == 2  # each difference written once


async def test_a_request_the_fold_cannot_serve_exactly_unfolds_it_for_good(tmp_path: Path) -> None:
    fake = FoldingFake()
    fp = FastPath(fake, max_lora_rank=16)
    v = LoadedAdapter("a@v1", 1, str(write_lora(tmp_path / "v1", rank=8, seed=1)))
    big = LoadedAdapter("a@v2", 2, str(write_lora(tmp_path / "v2", rank=16, seed=2)))
    fp.serve_folded(v)
    await fp.settled()
    await _run(fp, "big", big)  # 16 + 8 > 16: no exact difference LoRA, so V is unfolded first
    assert fake.ran[-1] == ("big", "a@v2", "")
    fp.serve_folded(v)
    await fp.settled()
    assert fp.folded == "" and fake.folds == [v.path, None]
    # A version too large for its base difference is never folded.
    fp2 = FastPath(FoldingFake(), max_lora_rank=16)
    fp2.serve_folded(big)
    await fp2.settled()
    assert fp2.folded == ""


async def test_a_request_cancelled_before_it_reaches_the_engine_does_not_block_the_next_fold(tmp_path: Path) -> None:
    fake = FoldingFake()
    fp = FastPath(fake, max_lora_rank=16)
    v = LoadedAdapter("a@v1", 1, str(write_lora(tmp_path / "v1", rank=4, seed=1)))
    fp.serve_folded(v)
    await fp.settled()
    # The bare base needs its difference LoRA written first (in a thread): cancel it meanwhile.
    task = asyncio.create_task(_run(fp, "cancelled", None))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fp.serve_folded(None)
    await asyncio.wait_for(fp.settled(), 5)  # a leaked "running" count would hold it for ever
    assert fp.folded == "" and fake.folds == [v.path, None]


# --------------------------------------------------------------------------- the worker's reload
class _Runner:
    """Stands in for vLLM's model runner: records what each reload was given."""

    def __init__(self) -> None:
        self.reloads: list[dict[str, torch.Tensor]] = []

    def reload_weights(self, weights_iterator: Iterator[tuple[str, torch.Tensor]]) -> None:
        self.reloads.append(dict(weights_iterator))


class _Worker(FoldWorkerExtension):
    """The fold extension over a two-layer checkpoint of 6x5 weights."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.base = {
            f"model.layers.{i}.{m}.weight": torch.randn(5, 6, generator=g)
            for i in range(2)
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")
        }
        self.base["model.norm.weight"] = torch.ones(6)
        self.model_runner = _Runner()

    def _tuneloop_checkpoint(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.base.items())


Q0, K0, UP1 = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
)


def test_a_fold_reloads_only_the_blocks_whose_weights_change_and_restores_the_last_folds(tmp_path: Path) -> None:
    worker = _Worker()
    runner = worker.model_runner
    attn0 = {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"}
    v = write_lora(tmp_path / "v", rank=2, seed=1, modules=("model.layers.0.self_attn.q_proj",))
    c = write_lora(tmp_path / "c", rank=2, seed=2, modules=("model.layers.1.mlp.up_proj",))

    worker.tuneloop_fold(str(v))
    # q_proj's siblings come along: vLLM fuses q/k/v into one layer that must be given all parts.
    assert set(runner.reloads[-1]) == attn0
    want = worker.base[Q0] + weight_deltas(read_lora(v))[Q0]
    assert torch.allclose(runner.reloads[-1][Q0], want)
    assert torch.equal(runner.reloads[-1][K0], worker.base[K0])

    worker.tuneloop_fold(str(c))  # V's block goes back to the base, C's gets C
    assert set(runner.reloads[-1]) == attn0 | {UP1}
    assert all(torch.equal(runner.reloads[-1][n], worker.base[n]) for n in attn0)

    worker.tuneloop_fold(None)
    assert set(runner.reloads[-1]) == {UP1}
    assert torch.equal(runner.reloads[-1][UP1], worker.base[UP1])
    worker.tuneloop_fold(None)  # already the base: nothing to reload
    assert len(runner.reloads) == 3


def test_after_a_failed_fold_the_restore_reloads_every_block_it_may_have_changed(tmp_path: Path) -> None:
    worker = _Worker()
    runner = worker.model_runner
    worker.tuneloop_fold(str(write_lora(tmp_path / "v", rank=2, seed=1, modules=("model.layers.0.self_attn.q_proj",))))
    bad = write_lora(
        tmp_path / "bad", rank=2, seed=2, modules=("model.layers.1.mlp.up_proj", "model.layers.1.mlp.gone")
    )
    with pytest.raises(ValueError, match="does not have"):
        worker.tuneloop_fold(str(bad))
    worker.tuneloop_fold(None)
    assert {n.rsplit(".", 2)[0] for n in runner.reloads[-1]} == {"model.layers.0.self_attn", "model.layers.1.mlp"}
    assert all(torch.equal(t, worker.base[n]) for n, t in runner.reloads[-1].items())
