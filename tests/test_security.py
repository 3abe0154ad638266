"""API keys with roles, TLS and mutual TLS on a real server."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
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
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(REQ, metadata=metadata)
            assert err.value.code() == code and words in err.value.details(), err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _drain(stub.GenerateStream(REQ, metadata=metadata))
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


async def test_tls_and_mutual_tls(make_server, pki: dict[str, Path]) -> None:
    tls = await make_server(tls_cert=str(pki["server.crt"]), tls_key=str(pki["server.key"]))
    creds = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    async with grpc.aio.secure_channel(f"localhost:{tls.port}", creds) as ch:
        assert (await pb_grpc.GenerationServiceStub(ch).Generate(REQ)).completions

    mtls = await make_server(
        tls_cert=str(pki["server.crt"]), tls_key=str(pki["server.key"]), tls_client_ca=str(pki["ca"])
    )
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
