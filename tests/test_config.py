"""Config merging (defaults < file < env < flags), validation messages and the API keys file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneloop.server.config import ConfigError, ServerConfig, build_arg_parser, load_config, read_api_keys


def test_defaults_embed_sqlite_and_a_local_adapter_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_HOME", str(tmp_path))
    cfg = load_config([], env={})
    assert cfg.store_url == f"sqlite:///{tmp_path.resolve()}/tuneloop.db"
    assert cfg.adapter_dir == str(tmp_path.resolve() / "adapters")
    assert cfg.port == 50051 and cfg.host == "127.0.0.1" and cfg.model == ""


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[server]\nport = 6000\nmax_model_len = 4096\nlog_level = "debug"\n')
    cfg = load_config(["--config", str(f), "--port", "7000"], env={"TUNELOOP_PORT": "6500", "TUNELOOP_MAX_LORAS": "3"})
    assert cfg.port == 7000  # flag
    assert cfg.max_loras == 3  # env
    assert cfg.max_model_len == 4096  # file
    assert cfg.log_level == "DEBUG"


def test_bool_flags_and_env(tmp_path: Path) -> None:
    assert load_config(["--no-completion-log"], env={}).completion_log is False
    assert load_config([], env={"TUNELOOP_COMPLETION_LOG": "false"}).completion_log is False
    with pytest.raises(ConfigError, match="completion_log"):
        load_config([], env={"TUNELOOP_COMPLETION_LOG": "maybe"})


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"port": 70000}, "port"),
        ({"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.key"}, "no such file"),
        ({"tls_cert": "x"}, "go together"),
        ({"max_tokens_limit": 4096, "max_model_len": 2048}, "max_tokens_limit"),
        ({"model": "/definitely/not/a/model"}, "config.json"),
        ({"dtype": "int3"}, "dtype"),
        ({"max_lora_rank": 12}, "max_lora_rank must be one of the ranks vLLM"),
    ],
)
def test_invalid_settings_name_the_setting(kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        ServerConfig(**kwargs)


def test_max_tokens_limit_follows_max_model_len() -> None:
    assert ServerConfig().max_tokens_limit == 1024
    cfg = load_config(["--max-model-len", "1024"], env={})
    assert cfg.max_tokens_limit == 512 and cfg.default_max_tokens == 128
    with pytest.raises(ConfigError, match="--default-max-tokens"):
        load_config(["--max-model-len", "128"], env={})  # limit 64 < the default 128
    assert load_config(["--max-model-len", "128", "--default-max-tokens", "32"], env={}).max_tokens_limit == 64
    with pytest.raises(ConfigError, match="--max-tokens-limit"):
        ServerConfig(max_tokens_limit=2048)


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(["--config", str(f)], env={})


def test_help_documents_every_setting() -> None:
    text = build_arg_parser().format_help()
    for name in ServerConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text


def test_api_keys_file(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("# comment\nk-0123456789abcdef generate,feedback\nk-admin-0123456789 admin  # trailing\n")
    keys = read_api_keys(str(f))
    assert keys == {
        "k-0123456789abcdef": frozenset({"generate", "feedback"}),
        "k-admin-0123456789": frozenset({"admin"}),
    }
    f.write_text("k-0123456789abcdef root\n")
    with pytest.raises(ConfigError, match="unknown role"):
        read_api_keys(str(f))
    f.write_text("short generate\n")
    with pytest.raises(ConfigError, match="too short"):
        read_api_keys(str(f))


def test_loopback_detection() -> None:
    assert ServerConfig(host="127.0.0.1").is_loopback()
    assert ServerConfig(host="::1").is_loopback()
    assert ServerConfig(host="localhost").is_loopback()
    assert not ServerConfig(host="0.0.0.0").is_loopback()


def test_registry_url_comes_from_env_and_slows_the_default_poll(tmp_path: Path) -> None:
    assert load_config([], env={}).registry_poll_s == 0.05  # a directory: a poll is one stat
    cfg = load_config([], env={"TUNELOOP_REGISTRY_URL": "s3://bucket/adapters"})
    assert cfg.registry_url == "s3://bucket/adapters" and cfg.registry_poll_s == 0.25
    assert load_config(["--registry-url", "s3://b/p", "--registry-poll-s", "2"], env={}).registry_poll_s == 2.0
    with pytest.raises(ConfigError, match="registry_url 'bucket/adapters' is not a URL"):
        ServerConfig(registry_url="bucket/adapters")
    with pytest.raises(ConfigError, match="registry_poll_s"):
        ServerConfig(registry_url="s3://b/p", registry_poll_s=60)
