"""The one engine interface the server talks to, and its vLLM implementation.

Everything vLLM-specific (engine arguments, `SamplingParams`, `LoRARequest`, its exception types)
stays in this module; the rest of the server sees `Engine`, `EngineRequest` and `EngineDelta`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from .allocator import preload_tcmalloc_for_children
from .config import ServerConfig
from .domain import SamplingSpec
from .errors import EngineUnavailable, FailedPrecondition, InvalidArgument, RequestFailed
from .hardware import fastest_dtype

# vLLM loads these by name inside its worker process (both modules import torch, so the server
# names them here instead of importing them).
SEEDED_SAMPLER = "tuneloop.server.vllm_sampling:SeededSampler"
WORKER_EXTENSION = "tuneloop.server.vllm_worker.WorkerExtension"

log = logging.getLogger(__name__)


# vLLM knows a LoRA by its integer id for the engine's whole life (its caches keep the weights
# under it), so an id is never given out twice in a process: not after an unload, and not by a
# second manager on the same engine, where a reused id would silently serve the old weights.
_ADAPTER_IDS = itertools.count(1)


def next_adapter_id() -> int:
    return next(_ADAPTER_IDS)


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter version as the engine knows it: a stable integer id and its files."""

    key: str  # "<name>@<version>", unique per version
    int_id: int  # vLLM needs a globally unique positive integer per adapter
    path: str


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    adapter: LoadedAdapter | None
    # Output tokens already generated and appended to the prompt: a request resumed after a
    # preemption (server/fast_path.py) continues at this output position.
    output_offset: int = 0
    # The engine admits waiting requests by (priority, arrival), lower first. A resumed request
    # gets RESUMED_PRIORITY: its caller already has output, so its re-read prefix waits behind
    # the prompts of new requests, whose callers are waiting for a first token.
    priority: int = 0


RESUMED_PRIORITY = 1


@dataclass(frozen=True)
class EngineDelta:
    """New output of one candidate since the last delta."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[tuple[int, str, float], ...] | None  # (token_id, token, logprob) per new token
    finish_reason: str | None  # None while running; "stop" or "length" at the end
    stop_sequence: str
    queue_s: float | None  # engine-side wait before scheduling, once known


class Engine(Protocol):
    """What the server needs from an inference engine."""

    max_model_len: int

    def render_chat(self, messages: list[dict[str, str]]) -> str: ...

    def tokenize(self, text: str) -> list[int]: ...

    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineDelta, None]: ...

    async def abort(self, request_id: str) -> None: ...

    async def add_adapter(self, adapter: LoadedAdapter) -> None: ...

    async def remove_adapter(self, adapter: LoadedAdapter) -> None: ...

    async def check_health(self) -> None: ...

    def shutdown(self) -> None: ...


def sampling_modes(chunked_prefill: str, seeded_sampling: str, cpu: bool) -> tuple[bool, bool]:
    """(chunked prefill on, tuneloop samples seeded requests) for the settings on this platform.

    vLLM's own seeded sampling rewinds a CUDA-only generator offset when a chunked prefill
    discards a sample, which kills its CPU engine; tuneloop's (`seeded_sampling.py`) has no state
    to rewind. So on CPU tuneloop samples seeded requests and chunked prefill stays on; if vLLM
    is asked to sample them there, chunked prefill must be off unless explicitly forced.
    """
    ours = seeded_sampling == "tuneloop" or (seeded_sampling == "auto" and cpu)
    if chunked_prefill == "auto":
        return (ours or not cpu), ours
    return chunked_prefill == "on", ours


def batched_tokens(setting: int, chunked: bool, max_model_len: int) -> int | None:
    """The engine's max_num_batched_tokens: vLLM's own default (None) for 0, else the setting;
    without chunked prefill a step must hold a whole prompt, so never below max_model_len then.
    (512-token steps on a 2-core CPU made the p50 first token of a 16-request burst later, not
    sooner: bench/serve_overhead.py, so auto keeps vLLM's choice.)"""
    if setting == 0:
        return None
    return setting if chunked else max(setting, max_model_len)


async def merge_candidates(streams: list[AsyncGenerator[EngineDelta, None]]) -> AsyncGenerator[EngineDelta, None]:
    """Interleave single-candidate streams as one n-candidate stream, candidate i from stream i.

    Closing the merged stream cancels every stream still running (vLLM aborts a request whose
    generator is cancelled); the first error of any stream ends the merged one with that error.
    """
    queue: asyncio.Queue[EngineDelta | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[EngineDelta, None]) -> None:
        try:
            async for delta in stream:
                queue.put_nowait(dataclasses.replace(delta, index=index))
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait(exc)
            return
        queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _is_cpu_build() -> bool:
    from vllm.platforms import current_platform  # noqa: PLC0415 - vLLM imports are slow; keep them lazy

    return current_platform.is_cpu()


class VllmEngine:
    """`Engine` over vLLM's in-process `AsyncLLM` (continuous batching, LoRA enabled)."""

    def __init__(self, llm: object, max_model_len: int, seeded_here: bool = False) -> None:
        self._llm = llm
        self._tokenizer = llm.get_tokenizer()  # type: ignore[attr-defined]
        self.max_model_len = max_model_len
        # True: seeded requests are sampled by tuneloop's SeededSampler inside vLLM's worker.
        self._seeded_here = seeded_here

    @classmethod
    def start(cls, config: ServerConfig, model_dir: str) -> VllmEngine:
        """Build the engine; blocks for the engine start (30-40 s on CPU). Call from a worker thread."""
        # The CPU build sizes its KV cache from this variable, not from gpu_memory_utilization.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(config.kv_cache_gib))))
        from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: PLC0415
        from vllm.v1.engine.async_llm import AsyncLLM  # noqa: PLC0415

        cpu = _is_cpu_build()
        if cpu:  # before vLLM spawns its processes: they inherit LD_PRELOAD
            preload_tcmalloc_for_children()
        chunked, seeded_here = sampling_modes(config.chunked_prefill, config.seeded_sampling, cpu)
        dtype = fastest_dtype(config.dtype, "cpu" if cpu else "cuda")
        args = AsyncEngineArgs(
            model=model_dir,
            dtype=dtype,  # type: ignore[arg-type] # one of vLLM's names: fastest_dtype returns DTYPE_NAMES
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enable_lora=True,
            max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank,  # type: ignore[arg-type] # ServerConfig checks it is in VLLM_LORA_RANKS
            max_cpu_loras=max(config.max_loras * 2, 4),
            enable_chunked_prefill=chunked,
            scheduling_policy="priority",  # EngineRequest.priority; equal priorities are first come, first served
            max_num_batched_tokens=batched_tokens(config.max_batched_tokens, chunked, config.max_model_len),
            logits_processors=[SEEDED_SAMPLER] if seeded_here else None,
            # The CPU LoRA kernels, and the fold of the fast path (run inside the worker).
            worker_extension_cls=WORKER_EXTENSION,
            gpu_memory_utilization=config.gpu_memory_utilization,
            # Per-request timings (queue time) need the engine's request stats.
            disable_log_stats=False,
            enable_log_requests=False,
        )
        log.info(
            "starting vLLM engine on %s (%s, dtype %s from %r, chunked prefill %s, %s tokens a step, seeded requests "
            "sampled by %s)",
            model_dir,
            "CPU" if cpu else "GPU",
            dtype,
            config.dtype,
            "on" if chunked else "off",
            args.max_num_batched_tokens or "vLLM's default",
            "tuneloop" if seeded_here else "vLLM",
        )
        llm = AsyncLLM.from_engine_args(args)
        return cls(llm, config.max_model_len, seeded_here)

    # -- prompt handling -------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self._tokenizer, "chat_template", None):
            raise InvalidArgument("this model has no chat template; send a plain prompt instead of chat messages")
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        # The chat template already holds the special tokens; a plain prompt goes in as written.
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    # -- generation ------------------------------------------------------------------------
    def _samples_seed_here(self, s: SamplingSpec) -> bool:
        """Whether tuneloop's SeededSampler, not vLLM, samples this request (greedy ignores seeds)."""
        return self._seeded_here and s.seed is not None and s.temperature > 0

    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineDelta, None]:
        s = request.sampling
        if self._samples_seed_here(s) and s.n > 1:
            # Each candidate becomes its own request with seed + index (vLLM's rule for the
            # candidates of a seeded request), since the sampler keys its noise by seed alone.
            return merge_candidates(
                [
                    self._generate_one(
                        dataclasses.replace(
                            request,
                            request_id=f"{request.request_id}-{i}",
                            sampling=dataclasses.replace(s, n=1, seed=(s.seed + i) % (1 << 64)),  # type: ignore[operator]
                        )
                    )
                    for i in range(s.n)
                ]
            )
        return self._generate_one(request)

    async def _generate_one(self, request: EngineRequest) -> AsyncGenerator[EngineDelta, None]:
        from vllm.exceptions import VLLMClientError  # noqa: PLC0415
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError  # noqa: PLC0415

        params = self._sampling_params(request.sampling, request.output_offset)
        lora = self._lora_request(request.adapter)
        try:
            async for out in self._llm.generate(  # type: ignore[attr-defined]
                {"prompt_token_ids": request.prompt_token_ids},
                params,
                request.request_id,
                lora_request=lora,
                priority=request.priority,
            ):
                queue_s = None
                stats = out.metrics
                if stats is not None and getattr(stats, "scheduled_ts", None) and getattr(stats, "queued_ts", None):
                    queue_s = max(0.0, stats.scheduled_ts - stats.queued_ts)
                for o in out.outputs:
                    logprobs = None
                    if request.sampling.logprobs and o.logprobs is not None:
                        logprobs = tuple(
                            (tid, lp[tid].decoded_token or "", float(lp[tid].logprob))
                            for tid, lp in zip(o.token_ids, o.logprobs, strict=True)
                        )
                    yield EngineDelta(
                        index=o.index,
                        text=o.text,
                        token_ids=tuple(o.token_ids),
                        logprobs=logprobs,
                        finish_reason=o.finish_reason,
                        stop_sequence=o.stop_reason if isinstance(o.stop_reason, str) else "",
                        queue_s=queue_s,
                    )
        except EngineDeadError as exc:
            raise EngineUnavailable(
                "the inference engine has stopped; this server cannot serve until restarted"
            ) from exc
        except (VLLMClientError, ValueError) as exc:
            raise InvalidArgument(f"the engine refused the request: {exc}") from exc
        except EngineGenerateError as exc:
            cause = exc.__cause__
            raise RequestFailed(f"generation failed: {type(cause).__name__ if cause else 'error'}: {cause}") from exc

    def _sampling_params(self, s: SamplingSpec, start: int = 0) -> object:
        from vllm import SamplingParams  # noqa: PLC0415
        from vllm.sampling_params import RequestOutputKind  # noqa: PLC0415

        from .seeded_sampling import seeded_extra_args  # noqa: PLC0415 - torch, loaded with vLLM

        temperature, top_p, top_k, seed, extra = s.temperature, s.top_p, s.top_k, s.seed, None
        if self._samples_seed_here(s):
            # vLLM sees an unseeded request whose every step SeededSampler has already decided.
            extra = seeded_extra_args(s.seed, temperature, top_p, top_k, start)  # type: ignore[arg-type]
            temperature, top_p, top_k, seed = 1.0, 1.0, 0, None
        return SamplingParams(
            n=s.n,
            max_tokens=s.max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k if top_k > 0 else 0,
            stop=list(s.stop) or None,
            seed=seed,
            # 0 = only the sampled token's log-probability.
            logprobs=0 if s.logprobs else None,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra,
        )

    @staticmethod
    def _lora_request(adapter: LoadedAdapter | None) -> object | None:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest  # noqa: PLC0415

        return LoRARequest(lora_name=adapter.key, lora_int_id=adapter.int_id, lora_path=adapter.path)

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)  # type: ignore[attr-defined]

    # -- preemption (server/fast_path.py) --------------------------------------------------
    def resumable(self, request: EngineRequest) -> bool:
        """Whether the request can be stopped and continued as a new request with its output so
        far appended to the prompt, sampling what it would have. Not with stop strings (vLLM holds
        back the text that may begin one, and a stop spanning the cut would be missed), not n > 1
        (candidates share one request), not seeded where vLLM samples the seed (its generator's
        state cannot be carried over)."""
        s = request.sampling
        seeded_ok = s.seed is None or s.temperature == 0 or self._samples_seed_here(s)
        return s.n == 1 and not s.stop and seeded_ok

    def ends_a_character(self, output_token_ids: list[int]) -> bool:
        """Whether text decoded from these output tokens ends at a character boundary: a cut
        inside a character's bytes would leave its first bytes to a request that never prints
        them. (A character spans at most four byte-level tokens.)"""
        return not self._tokenizer.decode(output_token_ids[-4:]).endswith("\ufffd")

    # -- adapters --------------------------------------------------------------------------
    async def add_adapter(self, adapter: LoadedAdapter) -> None:
        """Load the adapter into the engine; raises FailedPrecondition when vLLM refuses its files."""
        try:
            ok = await self._llm.add_lora(self._lora_request(adapter))  # type: ignore[attr-defined]
        except Exception as exc:  # vLLM raises plain ValueError/RuntimeError for bad adapter files
            if getattr(self._llm, "errored", False):
                raise EngineUnavailable("the inference engine has stopped") from exc
            raise FailedPrecondition(f"adapter {adapter.key} cannot be loaded: {exc}") from exc
        if not ok:
            raise FailedPrecondition(f"adapter {adapter.key} was refused by the engine")

    async def remove_adapter(self, adapter: LoadedAdapter) -> None:
        await self._llm.remove_lora(adapter.int_id)  # type: ignore[attr-defined]

    async def fold_weights(self, adapter_path: str | None) -> dict[str, object]:
        """Reload the weights as base + the adapter at `adapter_path` (server/vllm_fold.py); only
        while no request runs. The prefix cache is dropped: its blocks hold the old weights' keys."""
        [result] = await self._llm.collective_rpc("tuneloop_fold", args=(adapter_path,))  # type: ignore[attr-defined]
        # No request runs now, so nothing is preempted by `reset_running_requests`; it only makes
        # sure the reset happens (without it vLLM skips the reset while any block is in use, and a
        # stale block would hand later requests the old weights' keys and values).
        if not await self._llm.reset_prefix_cache(reset_running_requests=True):  # type: ignore[attr-defined]
            log.warning("vLLM did not drop its prefix cache after a weight fold")
        return dict(result)

    async def prepare_workers(self) -> None:
        """Once the engine serves: freeze each worker's start-up heap (server/vllm_worker.py)."""
        await self._llm.collective_rpc("tuneloop_freeze_heap")  # type: ignore[attr-defined]

    async def worker_states(self) -> list[dict[str, object]]:
        """Each worker's allocator and frozen object count (server/vllm_worker.py)."""
        return [dict(s) for s in await self._llm.collective_rpc("tuneloop_state")]  # type: ignore[attr-defined]

    # -- lifecycle -------------------------------------------------------------------------
    async def check_health(self) -> None:
        if self._llm is None or getattr(self._llm, "errored", False):
            raise EngineUnavailable("the inference engine has stopped")

    def unfinished_requests(self) -> int:
        """Requests the engine still holds (running or queued)."""
        return int(self._llm.get_num_unfinished_requests())  # type: ignore[attr-defined]

    @property
    def errored(self) -> bool:
        return self._llm is None or bool(getattr(self._llm, "errored", False))

    def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()  # type: ignore[attr-defined]
            # Dropping the last reference now lets AsyncLLM.__del__ run while the interpreter is
            # whole, instead of at exit when its module globals are already gone.
            del llm


async def start_engine(config: ServerConfig, model_dir: str) -> Engine:
    """Start the vLLM engine off the event loop so health checks keep answering meanwhile; with
    `fold_adapters`, behind the fast path that folds the default adapter into its weights."""
    engine = await asyncio.to_thread(VllmEngine.start, config, model_dir)
    await engine.prepare_workers()
    for state in await engine.worker_states():
        log.info("vLLM worker: allocates with %(allocator)s; %(frozen_objects)d start-up objects frozen", state)
    if not config.fold_adapters:
        return engine
    from .fast_path import FastPath  # noqa: PLC0415 - it imports this module

    return FastPath(engine, config.max_lora_rank, settle_s=config.fold_settle_s)
