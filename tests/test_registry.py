"""The directory registry: its layout on disk, corrupt files, the stat-keyed channel cache, and
atomic publish under a crash. What every registry does is in test_registry_contract.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_registry_contract import MANIFEST, make_adapter

from tuneloop.server.errors import InvalidArgument, NotFound
from tuneloop.server.registry import AdapterRegistry, base_model_fingerprint


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
