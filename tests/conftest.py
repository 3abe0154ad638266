"""Shared fixtures: one real vLLM engine on the real SmolLM2 model per test session, and a fresh
server (port 0, temp store and registry) per test that needs one."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# Small KV cache: the tests batch a handful of short requests.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ENGINE_MAX_MODEL_LEN = 1024


def engine_config(**overrides: object):
    from tuneloop.server.config import ServerConfig

    base: dict[str, object] = dict(
        port=0,
        metrics_port=0,
        max_model_len=ENGINE_MAX_MODEL_LEN,
        max_tokens_limit=512,
        max_num_seqs=32,
        kv_cache_gib=1.0,
        max_loras=2,
        max_lora_rank=16,
        grace_period_s=5.0,
        # TUNELOOP_TEST_SEEDED_SAMPLING=vllm with TUNELOOP_TEST_CHUNKED_PREFILL=on takes the
        # protection away: the seeded-batch test in test_serving.py then kills the CPU engine.
        chunked_prefill=os.environ.get("TUNELOOP_TEST_CHUNKED_PREFILL", "auto"),
        seeded_sampling=os.environ.get("TUNELOOP_TEST_SEEDED_SAMPLING", "auto"),
        # float32 here runs the engine tests as they run on a host without bf16 math.
        dtype=os.environ.get("TUNELOOP_TEST_DTYPE", "auto"),
    )
    base.update(overrides)
    return ServerConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """One PostgreSQL server for the session (`create_database()` gives each test its own
    database): started here, or the one TUNELOOP_TEST_POSTGRES_URL names."""
    from postgres_server import ExternalPostgres, PostgresServer, PostgresUnavailable

    external = os.environ.get("TUNELOOP_TEST_POSTGRES_URL")
    if external:
        yield ExternalPostgres(external)
        return
    try:
        server = PostgresServer()
        server.start()
    except (PostgresUnavailable, OSError) as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must exercise the PostgreSQL store: {e}")
        pytest.skip(f"no PostgreSQL server for the store tests: {e}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store on each backend in turn: a SQLite file, a database on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/tuneloop.db"
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture
def store(store_url: str) -> Iterator[object]:
    from tuneloop.server.store import open_store

    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3 API on loopback for the session (moto's server), with the standard AWS variables
    pointing at it, as a deployment sets them for the shared adapter registry."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "tuneloop-test",
        "AWS_SECRET_ACCESS_KEY": "tuneloop-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_url(s3_endpoint: str) -> str:
    """`s3://<a new bucket>/registry` on the session's S3 server."""
    import uuid

    import s3fs

    bucket = f"tuneloop-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)  # fsspec keeps one instance for the session
    return f"s3://{bucket}/registry"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from tuneloop.server.model_cache import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
async def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[object]:
    from tuneloop.server.engine import start_engine

    home = tmp_path_factory.mktemp("engine")
    eng = await start_engine(
        engine_config(store_url=f"sqlite:///{home}/unused.db", adapter_dir=str(home)), str(model_dir)
    )
    yield eng
    eng.shutdown()


@pytest.fixture
async def make_server(engine: object, tmp_path: Path) -> AsyncIterator[object]:
    """Builds servers on the shared engine, each with its own store and registry in tmp_path."""
    from tuneloop.server.app import TuneloopServer

    servers: list[TuneloopServer] = []

    async def make(**overrides: object) -> TuneloopServer:
        cfg = engine_config(
            **{
                "store_url": f"sqlite:///{tmp_path}/tuneloop-{len(servers)}.db",
                "adapter_dir": str(tmp_path / "adapters"),
                **overrides,
            }
        )
        srv = TuneloopServer(cfg, engine=engine)  # type: ignore[arg-type]
        servers.append(srv)
        await srv.start()
        await srv.wait_ready(timeout=30)
        return srv

    yield make
    for srv in servers:
        await srv.stop(grace=2)


@pytest.fixture
async def server(make_server):  # type: ignore[no-untyped-def]
    return await make_server()


@pytest.fixture
async def channel(server) -> AsyncIterator[grpc.aio.Channel]:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


# --------------------------------------------------------------------------- LoRA adapters
def make_lora(model_dir: Path, out: Path, rank: int, seed: int) -> Path:
    """A peft LoRA on q/k/v/o with random (non-zero) B, so it visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_dirs(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {
        "r8a": make_lora(model_dir, root / "r8a", 8, 1),
        "r8b": make_lora(model_dir, root / "r8b", 8, 2),
        "r32": make_lora(model_dir, root / "r32", 32, 3),
    }


# ------------------------------------------------------------------ TLS: a throwaway CA, server and client pairs
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str, key, issuer_cert=None, issuer_key=None, *, ca: bool = False, server: bool = False
) -> x509.Certificate:  # type: ignore[no-untyped-def]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return b.sign(issuer_key or key, hashes.SHA256())


def _pem(obj) -> bytes:  # type: ignore[no-untyped-def]
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_key = _key()
    ca = _cert("tuneloop-test-ca", ca_key, ca=True)
    srv_key, cli_key = _key(), _key()
    files = {
        "ca": _pem(ca),
        "server.crt": _pem(_cert("localhost", srv_key, ca, ca_key, server=True)),
        "server.key": _pem(srv_key),
        "client.crt": _pem(_cert("client", cli_key, ca, ca_key)),
        "client.key": _pem(cli_key),
    }
    out = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    return out
