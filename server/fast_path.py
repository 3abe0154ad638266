"""Serving the default adapter at base-model speed: its weights folded into the base.

vLLM's LoRA path costs every token (on CPU ~0.45x of the base model's throughput), and once the
trainer publishes, most traffic runs on one adapter version. `FastPath` wraps the engine and,
when told which version carries default traffic (`serve_folded`), reloads the engine's weights as
base + that version's update, then serves it with no LoRA at all. Every other path stays exact
through LoRAs of the difference (`lora_algebra.py`): the bare base is the folded weights minus
the version, another version C is the folded weights plus C minus the version.

Hot-swap guarantees hold: a request is translated against the weights it will run on, and no
request is in the engine while a fold changes them, so no response mixes two sets of weights. A
fold runs in two steps:

1. Drain. The requests running on the weights as they are, with no LoRA (the version folded now),
   finish on them: after the reload they would need a LoRA, and a continuation re-reads its whole
   prefix, which on a CPU's LoRA path costs more than waiting. New requests for that version
   wait for the fold; every other request keeps flowing, on its LoRA.
2. Hold. New requests wait (they are never failed) while the running ones, all on LoRAs now, are
   preempted: each is aborted at a character boundary and, once the weights are reloaded,
   continued as a new engine request with its output so far appended to the prompt, on the LoRA
   that gives its version on the new weights (none for the new version, the common case). Its
   caller sees a pause, not a seam: the same version produces the rest of the text (a seeded
   request samples at the positions it would have). Requests that cannot be continued that way
   (stop strings, n > 1; see `FoldableEngine.resumable`) are waited for instead.

So the first tokens of new requests wait for a reload (0.8-1.6 s under 64 busy streams on 2
cores, `bench/soak.py`), not for the longest running reply.

A publish or rollback takes effect at once through the difference LoRAs; the fold that makes the
new version fast follows in the background, `settle_s` later (a version replaced within the
settle is never folded), and holds new requests only once the adapter's files are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Protocol

from .engine import RESUMED_PRIORITY, Engine, EngineDelta, EngineRequest, LoadedAdapter, next_adapter_id
from .errors import EngineUnavailable
from .lora_algebra import Lora, NotFoldable, read_lora, write_difference

log = logging.getLogger(__name__)


class FoldableEngine(Engine, Protocol):
    async def fold_weights(self, adapter_path: str | None) -> dict[str, object]:
        """Make the engine's weights base + the adapter at `adapter_path` (bare base for None).
        Called only while no request runs."""
        ...

    def resumable(self, request: EngineRequest) -> bool:
        """Whether `request` can be aborted and continued as a new request whose prompt ends with
        its output so far (`EngineRequest.output_offset`), sampling what it would have."""
        ...

    def ends_a_character(self, output_token_ids: list[int]) -> bool:
        """Whether the text of these output tokens ends at a character boundary."""
        ...


@dataclasses.dataclass(eq=False)
class _Run:
    """One caller's request across the engine requests that serve it (more than one once a fold
    preempted it)."""

    request: EngineRequest
    resumable: bool
    tokens: list[int] = dataclasses.field(default_factory=list)  # output the caller has been given
    submitted: bool = False  # its current engine request is in the engine
    plain: bool = False  # ... with no LoRA: on the folded weights as they are
    cut: bool = False  # aborted for a fold after `tokens`; what the engine sends after is dropped
    resumes: int = 0

    @property
    def engine_id(self) -> str:
        rid = self.request.request_id
        return rid if self.resumes == 0 else f"{rid}~{self.resumes}"

    def engine_request(self, adapter: LoadedAdapter | None) -> EngineRequest:
        """The engine request that produces the rest of the output on `adapter`."""
        r, done = self.request, len(self.tokens)
        if self.resumes == 0:
            return dataclasses.replace(r, adapter=adapter)
        return dataclasses.replace(
            r,
            request_id=self.engine_id,
            prompt_token_ids=[*r.prompt_token_ids, *self.tokens],
            sampling=dataclasses.replace(r.sampling, max_tokens=r.sampling.max_tokens - done),
            adapter=adapter,
            output_offset=r.output_offset + done,
            priority=RESUMED_PRIORITY,
        )


@dataclasses.dataclass(frozen=True)
class _Fold:
    adapter: LoadedAdapter
    lora: Lora


class FastPath:
    """An `Engine` that serves one adapter version folded into the base weights."""

    def __init__(self, inner: FoldableEngine, max_lora_rank: int, *, settle_s: float = 0.0) -> None:
        self._inner = inner
        self._settle_s = settle_s
        self._fold_not_before = 0.0  # monotonic time before which no fold starts
        self._asked = asyncio.Event()  # set by every serve_folded: the settle may have moved
        self.max_model_len = inner.max_model_len
        self._max_rank = max_lora_rank
        self._folded: _Fold | None = None  # what the engine's weights hold now
        self._target: LoadedAdapter | None = None  # what they should hold
        self._open = asyncio.Event()  # cleared while a fold changes the weights
        self._open.set()
        self._idle = asyncio.Event()  # set while no request runs on the engine
        self._idle.set()
        self._running: set[_Run] = set()  # being translated or in the engine
        self._plain: set[_Run] = set()  # in the engine with no LoRA
        self._no_plain = asyncio.Event()  # set while `_plain` is empty
        self._no_plain.set()
        self._draining = asyncio.Event()  # set while a fold waits for `_plain` to empty
        self._folded_now = asyncio.Event()  # cleared while a fold drains or holds
        self._folded_now.set()
        self._cutting = False  # a fold is preempting the running requests
        # Cleared from a hold until the requests it held have gone to the engine: they go first.
        self._continuations = asyncio.Event()
        self._continuations.set()
        self._worker: asyncio.Task[None] | None = None
        # (plus key or "", folded key) -> the difference LoRA, written once: vLLM tells LoRAs apart
        # by name within a batch, so two ids under one name in flight would leave one unloaded.
        self._derived: dict[tuple[str, str], asyncio.Task[LoadedAdapter]] = {}
        self._unfoldable: dict[str, str] = {}  # adapter key -> why it is served through LoRA only
        self._dir = Path(tempfile.mkdtemp(prefix="tuneloop-fold-"))
        # Told of every reload: (folded key or "", seconds new requests were held, ok, requests preempted).
        self.on_fold: Callable[[str, float, bool, int], None] | None = None
        self.preempted = 0  # requests preempted by folds and continued, since start
        self._broken = False  # a failed fold could not restore the base weights

    # -- what the adapter manager calls -------------------------------------------------------------
    @property
    def folded(self) -> str:
        """Key of the version folded into the weights now ("" for the bare base)."""
        return self._folded.adapter.key if self._folded else ""

    def serve_folded(self, adapter: LoadedAdapter | None, *, at_once: bool = False) -> None:
        """Ask for `adapter` (None: the bare base) to be the folded version; the fold runs in the
        background after the settle (none with `at_once`), once the requests running then have
        finished."""
        if adapter is not None and adapter.key in self._unfoldable:
            adapter = None
        now = time.monotonic()
        if (adapter.key if adapter else "") == (self._target.key if self._target else ""):
            if at_once and self._fold_not_before > now:  # the same version, now without the settle
                self._fold_not_before = now
                self._asked.set()
            return
        self._target = adapter
        self._fold_not_before = now + (0.0 if at_once else self._settle_s)
        self._asked.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._converge(), name="fast-path-fold")

    @property
    def holding(self) -> bool:
        """True while a fold holds new requests (from the moment it can start until it is done)."""
        return not self._open.is_set()

    @property
    def draining(self) -> bool:
        """True while a fold waits for the requests on the weights as they are to finish."""
        return self._draining.is_set()

    async def settled(self) -> None:
        """Wait until the folded version is the one asked for (tests and benches)."""
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    # -- Engine ---------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self._inner.render_chat(messages)

    def tokenize(self, text: str) -> list[int]:
        return self._inner.tokenize(text)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineDelta, None]:
        run = _Run(request, resumable=self._inner.resumable(request))
        while True:
            await self._open.wait()
            if run.resumes:
                await self._continuations.wait()
            if self._broken:
                raise EngineUnavailable("a weight fold failed and the base weights could not be restored")
            # From here to the submit, the folded version cannot change: a fold first waits
            # for this request (it counts as running).
            self._enter(run)
            try:
                adapter = await self._translate(request.adapter)
            except NotFoldable as exc:
                self._leave(run)
                self._give_up_fold(str(exc))
                await self.settled()  # the unfold; then this request is translated again
                continue
            except BaseException:  # cancelled while its difference LoRA was written: not running
                self._leave(run)
                raise
            if self._cutting and run.resumable:  # a fold began meanwhile: translate after it
                self._leave(run)
                continue
            if adapter is None and self._draining.is_set():
                # It would run on the weights the fold is about to replace, and hold it up.
                self._leave(run)
                await self._folded_now.wait()
                continue
            run.submitted, run.plain = True, adapter is None
            if run.plain:
                self._plain.add(run)
                self._no_plain.clear()
            try:
                # Closed here when the caller goes away, so the engine request is aborted before
                # this one counts as gone (not later, when the garbage collector gets to it).
                async with contextlib.aclosing(self._inner.generate(run.engine_request(adapter))) as stream:
                    async for delta in stream:
                        if run.cut:
                            continue  # computed after the cut: the continuation generates it again
                        if delta.finish_reason is not None:
                            self._leave(run)  # done in the engine, whenever its caller reads this
                        run.tokens.extend(delta.token_ids)
                        # A continuation's engine queue time is not the caller's: keep the first.
                        yield delta if run.resumes == 0 else dataclasses.replace(delta, queue_s=None)
                        if self._cutting:  # `_cut` passes over a run that finished or was cut
                            await self._cut(run)  # it was mid-character when the fold began
            finally:
                self._leave(run)
            if not run.cut:
                return
            run.cut, run.submitted, run.plain = False, False, False
            run.resumes += 1

    async def abort(self, request_id: str) -> None:
        engine_ids = [r.engine_id for r in self._running if r.request.request_id == request_id]
        for engine_id in engine_ids or [request_id]:
            await self._inner.abort(engine_id)

    async def add_adapter(self, adapter: LoadedAdapter) -> None:
        await self._inner.add_adapter(adapter)

    async def remove_adapter(self, adapter: LoadedAdapter) -> None:
        await self._inner.remove_adapter(adapter)

    async def check_health(self) -> None:
        if self._broken:
            raise EngineUnavailable("a weight fold failed and the base weights could not be restored")
        await self._inner.check_health()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._inner.shutdown()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __getattr__(self, name: str) -> object:
        # What the concrete engine offers beyond the protocol (request counts, health flags).
        return getattr(self._inner, name)

    # -- translation ----------------------------------------------------------------------------
    def _enter(self, run: _Run) -> None:
        self._running.add(run)
        self._idle.clear()

    def _leave(self, run: _Run) -> None:
        self._running.discard(run)
        if not self._running:
            self._idle.set()
        self._plain.discard(run)
        if not self._plain:
            self._no_plain.set()

    async def _cut(self, run: _Run) -> None:
        """Preempt `run` for a fold if it can be continued from here; it leaves the engine once
        its abort is sent (the engine handles it before the fold's reload, sent after it)."""
        if run.cut or not (run.resumable and run.submitted) or run not in self._running:
            return
        if not self._inner.ends_a_character(run.tokens):
            return  # cut at its next token instead: the bytes so far are not a whole character
        run.cut = True
        self.preempted += 1
        try:
            await self._inner.abort(run.engine_id)
        finally:
            self._leave(run)

    async def _translate(self, adapter: LoadedAdapter | None) -> LoadedAdapter | None:
        """The LoRA that gives `adapter`'s weights (None: the bare base) on the folded weights."""
        fold = self._folded
        if fold is None:
            return adapter
        if adapter is not None and adapter.key == fold.adapter.key:
            return None
        key = (adapter.key if adapter else "", fold.adapter.key)
        task = self._derived.get(key)
        if task is None:
            # Requests held by a fold are released together and ask for the same difference at
            # once: one writes it, the others wait for that one (shielded: one waiter cancelled
            # must not cancel the write the others wait on).
            task = asyncio.ensure_future(asyncio.to_thread(self._write_derived, adapter, fold))
            self._derived[key] = task
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception:  # NotFoldable, or the write failed: the next request tries afresh
            if self._derived.get(key) is task:
                del self._derived[key]
            raise

    def _write_derived(self, adapter: LoadedAdapter | None, fold: _Fold) -> LoadedAdapter:
        # Read again for each difference written (once per version and fold): keeping every
        # version ever published in memory would grow with each publish.
        plus = read_lora(adapter.path) if adapter is not None else None
        rank = fold.lora.rank + (plus.rank if plus else 0)
        if rank > self._max_rank:
            raise NotFoldable(
                f"serving {adapter.key if adapter else 'the base model'} beside the folded {fold.adapter.key} "
                f"needs a rank-{rank} LoRA, above max_lora_rank {self._max_rank}"
            )
        name = f"{adapter.key if adapter else 'base'}~{fold.adapter.key}"
        out = self._dir / re.sub(r"[^A-Za-z0-9_.@~-]", "_", name)
        write_difference(plus, fold.lora, out)
        return LoadedAdapter(key=name, int_id=next_adapter_id(), path=str(out))

    def _give_up_fold(self, why: str) -> None:
        """A request needs a path the fold cannot give: serve the folded version through LoRA from
        now on (unfold) and never fold it again on this server."""
        if self._target is not None:
            log.warning("fast path off for %s: %s", self._target.key, why)
            self._unfoldable[self._target.key] = why
        if self._folded is not None:
            self._unfoldable[self._folded.adapter.key] = why
        self.serve_folded(None, at_once=True)  # a request waits for this one

    # -- folding --------------------------------------------------------------------------------
    async def _converge(self) -> None:
        try:
            while (self._target.key if self._target else "") != self.folded:
                # Requests keep flowing (through LoRA) during the settle and the file read; a
                # newer ask restarts the settle, so only the version that stays gets folded.
                while (wait := self._fold_not_before - time.monotonic()) > 0:
                    self._asked.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._asked.wait(), wait)
                target = self._target
                lora: Lora | None = None
                if target is not None:
                    try:
                        lora = await asyncio.to_thread(read_lora, target.path)
                        if 2 * lora.rank > self._max_rank:
                            raise NotFoldable(
                                f"rank {lora.rank}: the bare base model beside it would need rank {2 * lora.rank}, "
                                f"above max_lora_rank {self._max_rank}"
                            )
                    except Exception as exc:  # noqa: BLE001 - unreadable or unusual files: serve it through LoRA
                        log.warning("adapter %s stays on the LoRA path: %s", target.key, exc)
                        self._unfoldable[target.key] = str(exc)
                        self._target = None
                        continue
                if target is not self._target or self._fold_not_before > time.monotonic():
                    continue  # asked for another version while its files were read
                drain_from = time.perf_counter()
                self._folded_now.clear()
                self._draining.set()  # 1. the requests on the weights as they are finish on them
                await self._no_plain.wait()
                self._draining.clear()
                if target is not self._target or self._fold_not_before > time.monotonic():
                    self._folded_now.set()
                    continue  # asked for another version meanwhile
                held_at = time.perf_counter()
                self._continuations.clear()
                self._open.clear()  # 2. requests from now on wait for the fold
                self._cutting = True  # and the running ones are preempted
                preempted = self.preempted
                for run in list(self._running):
                    await self._cut(run)
                await self._idle.wait()  # the ones that could not be cut yet, or not at all
                self._cutting = False
                await self._fold(target, lora, held_at - drain_from, held_at, self.preempted - preempted)
                self._open.set()
                self._folded_now.set()
                # The held requests reach the engine ahead of the continuations (one loop turn
                # takes each as far as its submit): their prefills are short and give first
                # tokens, the continuations' are long ones of replies already under way.
                await asyncio.sleep(0)
                self._continuations.set()
        finally:
            self._cutting = False
            self._draining.clear()
            self._open.set()
            self._folded_now.set()
            self._continuations.set()

    async def _fold(
        self, target: LoadedAdapter | None, lora: Lora | None, drained_s: float, held_at: float, preempted: int
    ) -> None:
        started = time.perf_counter()
        ok = True
        try:
            await self._inner.fold_weights(target.path if target is not None else None)
        except Exception:  # noqa: BLE001 - the engine must come back to a known state
            log.exception("folding %s failed; serving it through LoRA", target.key if target else "base")
            ok = False
            if target is not None:
                self._unfoldable[target.key] = "its fold failed"
            self._target = None
            try:
                await self._inner.fold_weights(None)
            except Exception:  # noqa: BLE001 - reported as an unhealthy engine
                log.exception("restoring the base weights failed; the engine's weights are unknown")
                self._broken = True
            target = lora = None
        self._folded = _Fold(target, lora) if target is not None and lora is not None else None
        # They were differences to the old weights: no request can use them again (the fold ran
        # with none running, and later requests are translated against the new weights).
        # Removed off the event loop and without holding requests any longer.
        stale, self._derived = list(self._derived.values()), {}
        for task in stale:  # one still being written had only cancelled waiters
            task.add_done_callback(_remove_written)
        now = time.perf_counter()
        log.info(
            "fast path: %s in the base weights (reload %.2f s; new requests held %.2f s; %d running requests "
            "preempted and continued; %.2f s drain before)",
            self.folded or "nothing", now - started, now - held_at, preempted, drained_s,
        )  # fmt: skip
        if self.on_fold is not None:
            self.on_fold(self.folded, now - held_at, ok, preempted)


def _remove_written(task: asyncio.Task[LoadedAdapter]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    path = task.result().path
    asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, path, True)
