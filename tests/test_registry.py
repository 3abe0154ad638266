"""The adapter registry: layout, validation, channels, corrupt entries, and atomic publish under a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tuneloop.server.errors import FailedPrecondition, InvalidArgument, NotFound
from tuneloop.server.registry import AdapterRegistry, base_model_fingerprint


def make_adapter(tmp: Path, rank: int = 8, payload: bytes = b"weights") -> Path:
    d = tmp / f"adapter-{rank}-{payload.hex()[:8]}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 16, "peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(payload)
    return d


MANIFEST = {"base_model": "m@1", "algorithm": "dpo", "parent_version": None, "metrics": {"accuracy": 0.9}}


def test_publish_lays_out_versions_and_moves_current(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    assert reg.names() == []
    v1 = reg.publish("support", make_adapter(tmp_path), MANIFEST)
    assert (v1.version, v1.status, v1.rank, v1.base_model) == ("v1", "accepted", 8, "m@1")
    assert v1.path == tmp_path / "reg" / "support" / "versions" / "v1"
    assert sorted(p.name for p in v1.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    assert json.loads((tmp_path / "reg/support/channels/current.json").read_text())["version"] == "v1"
    v2 = reg.publish("support", make_adapter(tmp_path, rank=4), {**MANIFEST, "parent_version": "v1"})
    assert v2.version == "v2" and v2.parent_version == "v1" and v2.rank == 4
    assert reg.channel("support") == "v2"
    assert reg.resolve("support").version == "v2"
    assert reg.resolve("support", "v1").version == "v1"
    assert [v.version for v in reg.versions("support")] == ["v1", "v2"]
    assert reg.history("support") == ["v1"]
    assert reg.names() == ["support"]
    assert v2.manifest["created_at"] > 0 and v2.manifest["name"] == "support"


def test_rejected_version_is_kept_and_never_served(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.publish("a", make_adapter(tmp_path), MANIFEST)
    bad = reg.publish("a", make_adapter(tmp_path), {**MANIFEST, "metrics": {"accuracy": 0.1}}, accepted=False)
    assert bad.status == "rejected" and bad.manifest["metrics"]["accuracy"] == 0.1
    assert reg.channel("a") == "v1"
    with pytest.raises(FailedPrecondition, match="rejected"):
        reg.set_channel("a", "current", "v2")


def test_set_channel_and_history_for_rollback(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    for _ in range(3):
        reg.publish("a", make_adapter(tmp_path), MANIFEST)
    reg.set_channel("a", "current", "v1")
    reg.set_channel("a", "beta", "v3")
    assert reg.channel("a") == "v1" and reg.channel("a", "beta") == "v3"
    assert reg.history("a") == ["v1", "v2", "v3"]
    assert reg.history("a", "beta") == []
    with pytest.raises(InvalidArgument, match="start_canary"):
        reg.set_channel("a", "canary", "v3")


def test_a_canary_starts_is_replaced_and_ends_with_its_verdict_logged(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
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
    assert reg.canary("a") == replaced
    assert reg.end_canary("a", "rolled_back", expected="v2") is None  # no longer the canary: untouched
    assert reg.end_canary("a", "rolled_back", expected="v3", detail="worse") == replaced
    assert reg.canary("a") is None and reg.end_canary("a", "stopped") is None
    assert [(e["event"], e["version"]) for e in reg.canary_log("a")] == [
        ("started", "v2"), ("started", "v3"), ("rolled_back", "v3"),
    ]  # fmt: skip
    (tmp_path / "a" / "channels" / "canary.json").write_text("{not json")
    assert reg.canary("a") is None  # unreadable: no canary, and a warning


def test_not_found_and_bad_names(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
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
    with pytest.raises(InvalidArgument, match="missing adapter_model.safetensors"):
        empty = tmp_path / "empty"
        empty.mkdir()
        (empty / "adapter_config.json").write_text("{}")
        reg.publish("a", empty, MANIFEST)


def test_corrupt_entries_are_reported_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reg = AdapterRegistry(tmp_path)
    for _ in range(4):
        reg.publish("a", make_adapter(tmp_path), MANIFEST)
    vdir = tmp_path / "a" / "versions"
    (vdir / "v2" / "manifest.json").write_text("{not json")
    (vdir / "v3" / "adapter_model.safetensors").unlink()
    (tmp_path / "a" / "channels" / "canary.json").write_text("garbage")
    assert [v.version for v in reg.versions("a")] == ["v1", "v4"]
    assert "v2" in caplog.text and "unparsable" in caplog.text and "missing adapter_model" in caplog.text
    assert dict(reg.corrupt_versions("a")).keys() == {"v2", "v3"}
    with pytest.raises(NotFound, match="unreadable"):
        reg.get("a", "v2")
    assert reg.channel("a", "canary") is None
    # A corrupt entry never makes its number reusable.
    assert reg.publish("a", make_adapter(tmp_path), MANIFEST).version == "v5"


def test_channel_reads_follow_every_move_and_log_a_bad_file_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """channel_info is polled many times a second and answers from a stat-keyed cache."""
    reg, other = AdapterRegistry(tmp_path), AdapterRegistry(tmp_path)  # a second process's view
    for _ in range(3):
        other.publish("a", make_adapter(tmp_path), MANIFEST)
    for version in ("v1", "v3", "v2", "v3"):  # each move is read back at once, even back and forth
        other.set_channel("a", "current", version)
        assert reg.channel("a") == version
    channel = tmp_path / "a" / "channels" / "current.json"
    # A move that keeps the inode, size and mtime (inode reuse on a coarse-clock filesystem) is
    # still seen while the file is recent.
    stat = channel.stat()
    text = channel.read_text()
    channel.write_text(text.replace('"v3"', '"v1"'))
    os.utime(channel, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert channel.stat().st_ino == stat.st_ino and channel.stat().st_size == stat.st_size
    assert reg.channel("a") == "v1"
    # A settled bad file is logged once, not on every poll.
    channel.write_text("{half a wri")
    os.utime(channel, (1_000_000_000, 1_000_000_000))
    assert [reg.channel_info("a") for _ in range(3)] == [None, None, None]
    assert caplog.text.count("is unreadable") == 1
    other.set_channel("a", "current", "v2")  # repaired by the next move
    assert reg.channel("a") == "v2"
    channel.unlink()
    assert reg.channel("a") is None


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    src = make_adapter(tmp_path)
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(reg.publish("a", src, MANIFEST).version)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 7)]


_CRASHER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from tuneloop.server.registry import local as r

    step, root, src = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])

    def die(*a, **k):
        os._exit(9)  # no cleanup, no finally: as if the process was killed here

    real_copy = r.shutil.copyfile
    if step == "mid_copy":  # after the first adapter file is copied
        calls = []
        def copy(a, b):
            calls.append(a)
            if len(calls) == 2:
                die()
            return real_copy(a, b)
        r.shutil.copyfile = copy
    elif step == "before_commit":  # staged and fsynced, not renamed
        r.AdapterRegistry._commit = staticmethod(die)
    elif step == "before_channel":  # version renamed in, channel not moved
        r.AdapterRegistry._move_channel = die
    elif step == "mid_channel":  # channel temp file written, not renamed
        r.os.replace = die
    r.AdapterRegistry(root).publish("a", src, {"base_model": "m@1"})
    """
)


@pytest.mark.parametrize("step", ["mid_copy", "before_commit", "before_channel", "mid_channel"])
def test_publish_killed_between_steps_leaves_no_partial_version(tmp_path: Path, step: str) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.publish("a", make_adapter(tmp_path), MANIFEST)  # v1 is current
    src = make_adapter(tmp_path, payload=b"new weights")
    proc = subprocess.run(
        [sys.executable, "-c", _CRASHER, step, str(tmp_path / "reg"), str(src)], capture_output=True, text=True
    )
    assert proc.returncode == 9, proc.stderr
    versions = [v.version for v in reg.versions("a")]
    if step in ("before_channel", "mid_channel"):
        # The version is complete and visible; the channel still points at the old one.
        assert versions == ["v1", "v2"]
        assert (reg.get("a", "v2").path / "adapter_model.safetensors").read_bytes() == b"new weights"
    else:
        assert versions == ["v1"]
    assert reg.channel("a") == "v1"
    assert reg.corrupt_versions("a") == []
    # The next publish cleans up the leftovers and numbers on.
    nxt = reg.publish("a", src, MANIFEST)
    assert nxt.version == f"v{len(versions) + 1}" and reg.channel("a") == nxt.version
    leftovers = [p.name for p in (tmp_path / "reg/a/versions").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert [p.name for p in (tmp_path / "reg/a/channels").iterdir() if p.name.endswith(".tmp")] == []


def test_base_model_fingerprint(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(os.urandom(3 << 20))
    fp = base_model_fingerprint(d)
    assert fp.startswith("m@") and fp == base_model_fingerprint(d)
    (d / "model.safetensors").write_bytes(os.urandom(3 << 20))
    assert base_model_fingerprint(d) != fp
    with pytest.raises(InvalidArgument, match="config.json is missing"):
        base_model_fingerprint(tmp_path)
