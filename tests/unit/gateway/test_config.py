"""Configuration rules that guard the node: connection timeouts, and the
published development keys kept to loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from nearstore.gateway import config
from nearstore.gateway.config import ConfigError, is_loopback, load


@pytest.mark.parametrize(("host", "expected"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.7", False), ("gpu-node-3", False),
])
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_dev_keys_only_on_loopback() -> None:
    cfg = load(env={})
    assert cfg.using_dev_keys and cfg.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="NEARSTORE_ACCESS_KEY"):
        load(env={}, overrides={"host": "0.0.0.0"})
    dev = {"NEARSTORE_ACCESS_KEY": config.DEV_ACCESS_KEY, "NEARSTORE_SECRET_KEY": config.DEV_SECRET_KEY}
    with pytest.raises(ConfigError, match="development keys"):
        load(env={**dev, "NEARSTORE_HOST": "10.1.2.3"})
    own = load(env={"NEARSTORE_ACCESS_KEY": "a", "NEARSTORE_SECRET_KEY": "s3cret"}, overrides={"host": "0.0.0.0"})
    assert own.credentials == {"a": "s3cret"} and not own.using_dev_keys


def test_timeouts_from_file_env_and_defaults(tmp_path: Path) -> None:
    cfg = load(env={})
    assert (cfg.limits.head_timeout, cfg.limits.idle_timeout, cfg.limits.body_timeout) == (10.0, 60.0, 30.0)
    path = tmp_path / "n.toml"
    path.write_text("[server]\nhead_timeout = 2.5\nidle_timeout = 120\nbody_timeout = 5\n")
    cfg = load(str(path), env={"NEARSTORE_BODY_TIMEOUT": "7"})
    assert (cfg.limits.head_timeout, cfg.limits.idle_timeout, cfg.limits.body_timeout) == (2.5, 120.0, 7.0)
    handler_args = cfg.limits.handler_args()
    assert handler_args["keepalive_timeout"] == 120.0
    assert handler_args["max_field_size"] <= handler_args["max_line_size"] < cfg.limits.max_head_bytes


@pytest.mark.parametrize("value", ["0", "-1", "soon", "1e9"])
def test_bad_timeouts_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="NEARSTORE_HEAD_TIMEOUT"):
        load(env={"NEARSTORE_HEAD_TIMEOUT": value})
