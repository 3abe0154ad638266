"""API keys with roles, TLS and mutual TLS on a real server."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine

GEN_KEY = "gen-key-0123456789abcdef"
FEEDBACK_KEY = "fb-key-0123456789abcdef"
REQ = pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(max_tokens=2, temperature=0))


async def test_api_keys_and_roles(make_server, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{GEN_KEY} generate\n{FEEDBACK_KEY} feedback\n")
    server = await make_server(api_keys_file=str(keys))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        cases = [
            ((), grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
            ((("authorization", "Bearer nope-nope-nope-nope"),), grpc.StatusCode.UNAUTHENTICATED, "unknown API key"),
            ((("authorization", f"Basic {GEN_KEY}"),), grpc.StatusCode.UNAUTHENTICATED, "missing API key"),
            ((("authorization", f"Bearer {FEEDBACK_KEY}"),), grpc.StatusCode.PERMISSION_DENIED, "'generate' role"),
        ]
        for metadata, code, words in cases:
            for call in (lambda: stub.Generate(REQ, metadata=metadata), lambda: _drain(stub.GenerateStream(REQ, metadata=metadata))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call()
                assert err.value.code() == code and words in err.value.details(), err.value.details()
        ok = await stub.Generate(REQ, metadata=(("authorization", f"Bearer {GEN_KEY}"),))
        assert ok.completions
        # Health needs no key, so orchestrators can probe.
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_without_keys_everything_is_open(server, channel) -> None:
    assert (await pb_grpc.GenerationServiceStub(channel).Generate(REQ)).completions


async def _drain(call: grpc.aio.UnaryStreamCall) -> None:
    async for _ in call:
        pass


# --------------------------------------------------------------------------- TLS
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, *, ca: bool = False, server: bool = False) -> x509.Certificate:  # type: ignore[no-untyped-def]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.timezone.utc)
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
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


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


async def test_tls_and_mutual_tls(make_server, pki: dict[str, Path]) -> None:
    tls = await make_server(tls_cert=str(pki["server.crt"]), tls_key=str(pki["server.key"]))
    creds = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    async with grpc.aio.secure_channel(f"localhost:{tls.port}", creds) as ch:
        assert (await pb_grpc.GenerationServiceStub(ch).Generate(REQ)).completions

    mtls = await make_server(tls_cert=str(pki["server.crt"]), tls_key=str(pki["server.key"]), tls_client_ca=str(pki["ca"]))
    async with grpc.aio.secure_channel(f"localhost:{mtls.port}", creds) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.GenerationServiceStub(ch).Generate(REQ, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # handshake refused without a client cert
    client_creds = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki["client.key"].read_bytes(),
        certificate_chain=pki["client.crt"].read_bytes(),
    )
    async with grpc.aio.secure_channel(f"localhost:{mtls.port}", client_creds) as ch:
        assert (await pb_grpc.GenerationServiceStub(ch).Generate(REQ)).completions
