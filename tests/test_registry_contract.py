"""The registry contract: the same cases against the local directory and against the object
store (S3 on the session's loopback moto server), each through a fresh instance per host as a
replica or a trainer would hold one. Directory-only behaviour (fcntl, stat cache, a publisher
killed mid-way) stays in test_registry.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tuneloop.server.errors import FailedPrecondition, InvalidArgument, NotFound
from tuneloop.server.registry import AdapterRegistry, Registry, RegistryUnavailable, open_registry
from tuneloop.server.registry.cache import cache_root
from tuneloop.server.registry.objectstore import ObjectStoreRegistry

MANIFEST = {"base_model": "m@1", "algorithm": "dpo", "parent_version": None, "metrics": {"accuracy": 0.9}}


def make_adapter(tmp: Path, rank: int = 8, payload: bytes = b"weights") -> Path:
    d = tmp / f"adapter-{rank}-{payload.hex()[:16]}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 16, "peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(payload)
    return d


@dataclass
class Backend:
    kind: str
    open: Callable[[str], Registry]  # one host's view: a new instance (its own cache for the object store)
    # Leave `version` of `name` as a publisher that died after its first file would.
    half_write: Callable[[str, str], None]
    # Make `version`'s manifest unparsable.
    corrupt_manifest: Callable[[str, str], None]


@pytest.fixture(params=["directory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    src = make_adapter(tmp_path / "half")
    if request.param == "directory":
        root = tmp_path / "reg"

        def half_dir(name: str, version: str) -> None:
            d = root / name / "versions" / version
            d.mkdir(parents=True)
            (d / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())

        def corrupt_dir(name: str, version: str) -> None:
            (root / name / "versions" / version / "manifest.json").write_text("{not json")

        return Backend("directory", lambda host: AdapterRegistry(root), half_dir, corrupt_dir)
    url = request.getfixturevalue("s3_url")
    writer = ObjectStoreRegistry.open(url, tmp_path / "writer-cache")

    def half_s3(name: str, version: str) -> None:
        assert writer.blobs.create(f"{name}/versions/{version}/claim.json", b"{}")
        writer.blobs.upload(src / "adapter_config.json", f"{name}/versions/{version}/adapter_config.json")

    def corrupt_s3(name: str, version: str) -> None:
        writer.blobs.write(f"{name}/versions/{version}/manifest.json", b"{not json")

    return Backend("s3", lambda host: open_registry(url, tmp_path / f"cache-{host}"), half_s3, corrupt_s3)


def test_publish_resolve_versions_history(backend: Backend, tmp_path: Path) -> None:
    reg = backend.open("a")
    assert reg.names() == []
    v1 = reg.publish("support", make_adapter(tmp_path), MANIFEST)
    assert (v1.version, v1.status, v1.rank, v1.base_model) == ("v1", "accepted", 8, "m@1")
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= {p.name for p in v1.path.iterdir()}
    v2 = reg.publish("support", make_adapter(tmp_path, rank=4, payload=b"w2"), {**MANIFEST, "parent_version": "v1"})
    assert v2.version == "v2" and v2.parent_version == "v1" and v2.rank == 4
    assert v2.manifest["created_at"] > 0 and v2.manifest["name"] == "support"
    other = backend.open("b")  # another host: nothing of these versions on its disk yet
    assert other.channel("support") == "v2"
    current = other.resolve("support")
    assert current.version == "v2" and (current.path / "adapter_model.safetensors").read_bytes() == b"w2"
    assert other.resolve("support", "v1").rank == 8
    assert [v.version for v in other.versions("support")] == ["v1", "v2"]
    assert other.history("support") == ["v1"]
    assert other.names() == ["support"]


def test_rejected_version_is_kept_and_never_served(backend: Backend, tmp_path: Path) -> None:
    reg = backend.open("a")
    reg.publish("a", make_adapter(tmp_path), MANIFEST)
    bad = reg.publish("a", make_adapter(tmp_path), {**MANIFEST, "metrics": {"accuracy": 0.1}}, accepted=False)
    assert bad.status == "rejected" and bad.manifest["metrics"]["accuracy"] == 0.1
    assert reg.channel("a") == "v1"
    with pytest.raises(FailedPrecondition, match="rejected"):
        backend.open("b").set_channel("a", "current", "v2")


def test_set_channel_and_history_for_rollback(backend: Backend, tmp_path: Path) -> None:
    reg = backend.open("a")
    for _ in range(3):
        reg.publish("a", make_adapter(tmp_path), MANIFEST)
    reg.set_channel("a", "current", "v1")
    reg.set_channel("a", "beta", "v3")
    reg.set_channel("a", "beta", "v3")  # no move, no history line
    assert reg.channel("a") == "v1" and reg.channel("a", "beta") == "v3"
    assert reg.history("a") == ["v1", "v2", "v3"]
    assert reg.history("a", "beta") == []
    info = reg.channel_info("a")
    assert info is not None and info[0] == "v1" and info[1] > 0
    with pytest.raises(InvalidArgument, match="start_canary"):
        reg.set_channel("a", "canary", "v3")
    with pytest.raises(NotFound):
        reg.set_channel("a", "current", "v9")


def test_canary_starts_is_replaced_and_ends_with_expected(backend: Backend, tmp_path: Path) -> None:
    reg = backend.open("a")
    for accepted in (True, True, True, False):
        reg.publish("a", make_adapter(tmp_path), MANIFEST, accepted=accepted)
    assert reg.channel("a") == "v3" and reg.canary("a") is None
    reg.set_channel("a", "current", "v1")
    entry = reg.start_canary("a", "v2", 0.1)
    assert reg.canary("a") == entry and (entry.version, entry.share, entry.auto_decide) == ("v2", 0.1, True)
    assert reg.channel("a") == "v1"  # a canary never moves `current`
    with pytest.raises(FailedPrecondition, match="already current"):
        reg.start_canary("a", "v1", 0.1)
    with pytest.raises(FailedPrecondition, match="rejected"):
        reg.start_canary("a", "v4", 0.1)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(InvalidArgument, match="share"):
            reg.start_canary("a", "v2", bad)
    replaced = reg.start_canary("a", "v3", 0.5, auto_decide=False)
    other = backend.open("b")
    assert other.canary("a") == replaced
    assert other.end_canary("a", "rolled_back", expected="v2") is None  # no longer the canary: untouched
    assert reg.canary("a") == replaced
    assert other.end_canary("a", "rolled_back", expected="v3", detail="worse") == replaced
    assert reg.canary("a") is None and reg.end_canary("a", "stopped") is None
    assert [(e["event"], e["version"]) for e in reg.canary_log("a")] == [
        ("started", "v2"), ("started", "v3"), ("rolled_back", "v3"),
    ]  # fmt: skip


def test_not_found_and_bad_names(backend: Backend, tmp_path: Path) -> None:
    reg = backend.open("a")
    with pytest.raises(NotFound, match="no adapter named ghost"):
        reg.resolve("ghost")
    reg.publish("a", make_adapter(tmp_path), MANIFEST, accepted=False)
    with pytest.raises(NotFound, match="no 'current' version"):
        reg.resolve("a")
    with pytest.raises(NotFound, match=r"no version v9 \(known versions: v1\)"):
        reg.get("a", "v9")
    with pytest.raises(InvalidArgument, match="reserved"):
        reg.publish("base", make_adapter(tmp_path), MANIFEST)
    for bad in ("", "Upper", "-x", "a" * 65, "a/b", "../x"):
        with pytest.raises(InvalidArgument):
            reg.versions(bad)
    with pytest.raises(InvalidArgument, match="versions look like"):
        reg.get("a", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text("{}")
    with pytest.raises(InvalidArgument, match="missing adapter_model.safetensors"):
        reg.publish("a", empty, MANIFEST)


def test_a_reader_elsewhere_sees_every_move(backend: Backend, tmp_path: Path) -> None:
    writer, reader = backend.open("trainer"), backend.open("replica")
    for i in range(3):
        writer.publish("a", make_adapter(tmp_path, payload=b"w%d" % i), MANIFEST)
    for version in ("v1", "v3", "v2", "v3"):  # each move is read back at once, even back and forth
        writer.set_channel("a", "current", version)
        assert reader.channel("a") == version
        assert reader.resolve("a").version == version
    assert reader.canary("a") is None
    writer.start_canary("a", "v1", 0.25)
    canary = reader.canary("a")
    assert canary is not None and (canary.version, canary.share) == ("v1", 0.25)
    writer.end_canary("a", "promoted")
    assert reader.canary("a") is None


def test_two_publishers_at_once_never_share_a_version(backend: Backend, tmp_path: Path) -> None:
    """Six publishes from two hosts at once: six distinct numbers, each with its own weights."""
    hosts = [backend.open("a"), backend.open("b")]
    got: list[tuple[str, bytes]] = []
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        payload = b"weights of publish %d" % i
        try:
            v = hosts[i % 2].publish("a", make_adapter(tmp_path / str(i), payload=payload), MANIFEST)
            got.append((v.version, payload))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(v for v, _ in got) == sorted(f"v{i}" for i in range(1, 7))
    reader = backend.open("c")
    for version, payload in got:  # every version holds the weights of the publish that got its number
        assert (reader.get("a", version).path / "adapter_model.safetensors").read_bytes() == payload
    assert reader.channel("a") in {v for v, _ in got}
    assert len(reader.history("a")) == 5  # every move recorded, none lost to a concurrent one


def test_corrupt_and_half_written_versions_are_skipped_and_never_reused(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reg = backend.open("a")
    for _ in range(2):
        reg.publish("a", make_adapter(tmp_path), MANIFEST)
    backend.half_write("a", "v3")
    backend.corrupt_manifest("a", "v2")
    reader = backend.open("b")
    assert [v.version for v in reader.versions("a")] == ["v1"]
    assert "v2" in caplog.text and "v3" in caplog.text
    assert dict(reader.corrupt_versions("a")).keys() == {"v2", "v3"}
    for version in ("v2", "v3"):
        with pytest.raises(NotFound, match="unreadable"):
            reader.get("a", version)
    assert reader.publish("a", make_adapter(tmp_path), MANIFEST).version == "v4"
    assert reader.resolve("a").version == "v4"


def test_an_unreadable_channel_state_reads_as_unset_until_the_next_move(backend: Backend, tmp_path: Path) -> None:
    reg = backend.open("a")
    reg.publish("a", make_adapter(tmp_path), MANIFEST)
    reg.publish("a", make_adapter(tmp_path), MANIFEST)
    if isinstance(reg, ObjectStoreRegistry):
        reg.blobs.write("a/state.json", b"{half a wri")
    else:
        (tmp_path / "reg" / "a" / "channels" / "current.json").write_text("{half a wri")
    reader = backend.open("b")
    assert reader.channel("a") is None
    reg.set_channel("a", "current", "v1")  # repaired by the next move
    assert reader.channel("a") == "v1"
    reg.start_canary("a", "v2", 0.5)
    if isinstance(reg, ObjectStoreRegistry):
        state = json.loads(reg.blobs.read("a/state.json").data)  # type: ignore[union-attr]
        reg.blobs.write("a/state.json", json.dumps({**state, "canary": {"version": "v2"}}).encode())
    else:
        (tmp_path / "reg" / "a" / "channels" / "canary.json").write_text("{not json")
    assert reader.canary("a") is None and reader.channel("a") == "v1"


# -- the object store only: the local cache of fetched versions -----------------------------
def test_a_fetched_version_is_verified_cached_and_reused(s3_url: str, tmp_path: Path) -> None:
    writer = ObjectStoreRegistry.open(s3_url, tmp_path / "trainer")
    writer.publish("a", make_adapter(tmp_path, payload=b"good weights"), MANIFEST)
    writer.publish("a", make_adapter(tmp_path, payload=b"more weights"), MANIFEST)
    cache = tmp_path / "replica"
    first = ObjectStoreRegistry.open(s3_url, cache)
    v1 = first.get("a", "v1")
    assert v1.path == cache_root(cache, s3_url) / "a" / "versions" / "v1"
    assert (v1.path / "adapter_model.safetensors").read_bytes() == b"good weights"
    assert v1.manifest["files"]["adapter_model.safetensors"]["size"] == len(b"good weights")
    # A restarted replica reuses what it fetched: versions never change, so no download happens
    # (the weights are gone from the store and it still serves v1 from its disk).
    writer.blobs.write("a/versions/v1/adapter_model.safetensors", b"")
    again = ObjectStoreRegistry.open(s3_url, cache).get("a", "v1")
    assert again.path == v1.path and (again.path / "adapter_model.safetensors").read_bytes() == b"good weights"
    # A version whose bytes do not match its manifest is refused, and nothing of it is left in the
    # cache: no version directory, no temporary one.
    writer.blobs.write("a/versions/v2/adapter_model.safetensors", b"tampered weights")
    with pytest.raises(NotFound, match="does not match its manifest"):
        first.get("a", "v2")
    assert sorted(p.name for p in v1.path.parent.iterdir()) == ["v1"]


def test_two_processes_fetching_one_version_share_one_cached_copy(s3_url: str, tmp_path: Path) -> None:
    ObjectStoreRegistry.open(s3_url, tmp_path / "trainer").publish("a", make_adapter(tmp_path), MANIFEST)
    cache = tmp_path / "replica"
    readers = [ObjectStoreRegistry.open(s3_url, cache) for _ in range(4)]
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda r=r: paths.append(r.get("a", "v1").path)) for r in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 4 and len(set(paths)) == 1
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["v1"]
    assert (paths[0] / "adapter_model.safetensors").read_bytes() == b"weights"


def test_an_unusable_registry_url_fails_with_the_setting_and_what_to_do(s3_endpoint: str, tmp_path: Path) -> None:
    with pytest.raises(RegistryUnavailable, match="registry_url 's3://no-such-bucket/x'.*does not exist"):
        open_registry("s3://no-such-bucket/x", tmp_path)
    with pytest.raises(RegistryUnavailable, match="registry_url 'ftp://host/x'.*s3://"):
        open_registry("ftp://host/x", tmp_path)
    with pytest.raises(RegistryUnavailable, match="not a URL"):
        open_registry("bucket/prefix", tmp_path)


def test_an_unreachable_endpoint_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(RegistryUnavailable, match=r"endpoint http://127.0.0.1:9\) cannot be reached.*AWS_ENDPOINT_URL"):
        open_registry("s3://bucket/prefix", tmp_path)


def test_the_cli_reads_the_shared_registry(
    s3_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tuneloop.cli.main import main

    trainer = ObjectStoreRegistry.open(s3_url, tmp_path / "trainer")
    trainer.publish("a", make_adapter(tmp_path), MANIFEST)
    trainer.publish("a", make_adapter(tmp_path), MANIFEST, accepted=False)
    cache = str(tmp_path / "cli")
    assert main(["adapters", "list", "--registry-url", s3_url, "--registry-dir", cache, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["version"], r["status"], r["current"]) for r in rows] == [
        ("v1", "accepted", True),
        ("v2", "rejected", False),
    ]
    monkeypatch.setenv("TUNELOOP_REGISTRY_URL", s3_url)  # the server's variable is the default
    assert main(["adapters", "show", "a", "--registry-dir", cache]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v1" and Path(shown["path"]).is_relative_to(cache_root(Path(cache), s3_url))
    assert main(["adapters", "list", "--registry-url", "s3://no-such-bucket/x"]) == 1
    assert "registry_url 's3://no-such-bucket/x'" in capsys.readouterr().err


def test_a_registry_at_the_root_of_a_bucket(s3_url: str, tmp_path: Path) -> None:
    bucket_root = s3_url.rsplit("/", 1)[0]
    reg = open_registry(bucket_root, tmp_path)
    assert reg.names() == []
    reg.publish("a", make_adapter(tmp_path), MANIFEST)
    assert reg.names() == ["a"] and open_registry(bucket_root, tmp_path / "b").resolve("a").version == "v1"


def test_the_trainer_opens_the_servers_registry(s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneloop.trainer.config import TrainerConfig

    monkeypatch.delenv("TUNELOOP_REGISTRY_URL", raising=False)
    assert isinstance(TrainerConfig(registry_dir=str(tmp_path)).open_registry(), AdapterRegistry)
    monkeypatch.setenv("TUNELOOP_REGISTRY_URL", s3_url)  # the server's variable, as for the store
    reg = TrainerConfig(registry_dir=str(tmp_path)).open_registry()
    assert isinstance(reg, ObjectStoreRegistry) and reg.url == s3_url
    assert reg.cache.root.is_relative_to(tmp_path)
