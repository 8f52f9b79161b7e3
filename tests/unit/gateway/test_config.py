"""Configuration rules that guard the node: connection timeouts, and the
published development keys kept to loopback."""

from __future__ import annotations

import hashlib
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


# --- strict configuration: every mistake is loud ---------------------------------


def _file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "nearstore.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("text", "message"), [
    ("[server]\nhost = \"127.0.0.1\"\nprot = 5630\n", r"nearstore.toml:3: \[server\] unknown setting 'prot'; did you mean 'port'\?"),
    ("[server]\nport = 9001\n\n[cahce]\nsize = \"1GiB\"\n", r"nearstore.toml:4: unknown section \[cahce\]; did you mean 'cache'\?"),
    ("[cache]\nchunk_sise = \"8MiB\"\n", r"nearstore.toml:2: \[cache\] unknown setting 'chunk_sise'; did you mean 'chunk_size'\?"),
    ("[[buckets]]\nname = \"d\"\nendpoint = \"http://x\"\nsecret = \"s\"\n",
     r"nearstore.toml:4: \[\[buckets\]\] unknown setting 'secret'; did you mean 'secret_key'\?"),
    ("[server]\nport = \"nine thousand\"\n", r"nearstore.toml:2: \[server\] port: expected a whole number"),
    ("[server]\nport = 70000\n", r"nearstore.toml:2: \[server\] port: must be between 1 and 65535"),
    ("[server]\nfsync = \"maybe\"\n", r"nearstore.toml:2: \[server\] fsync: expected true or false"),
    ("[cache]\npolicy = \"lfu\"\n", r"nearstore.toml:2: \[cache\] policy: one of"),
    ("[tls]\ncert = 5\n", r"nearstore.toml:2: \[tls\] cert: expected a string"),
])
def test_a_mistake_in_the_file_names_file_line_and_the_nearest_name(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(_file(tmp_path, text), env={})


def test_every_setting_from_file_env_and_flag(tmp_path: Path) -> None:
    path = _file(tmp_path, "[server]\nport = 9100\nfsync = false\n[cache]\nsize = \"2GiB\"\npolicy = \"lru\"\n"
                           "[cluster]\npeers = [\"http://127.0.0.1:9100/\"]\n")
    cfg = load(path, env={"NEARSTORE_PORT": "9200", "NEARSTORE_CACHE_VERIFY": "off",
                          "NEARSTORE_CHUNK_SIZE": "8MiB"}, overrides={"port": "9300", "cache_size": "3GiB"})
    assert (cfg.port, cfg.fsync, cfg.cache.size, cfg.cache.policy) == (9300, False, 3 << 30, "lru")
    assert (cfg.cache.verify, cfg.cache.chunk_size, cfg.cluster_peers) == (False, 8 << 20, ["http://127.0.0.1:9100"])
    with pytest.raises(ConfigError, match="NEARSTORE_WORKERS: must be between 1 and 256"):
        load(env={"NEARSTORE_WORKERS": "0"})
    with pytest.raises(ConfigError, match="--port: expected a whole number"):
        load(env={}, overrides={"port": "x"})


def test_an_unknown_nearstore_variable_is_warned_about() -> None:
    cfg = load(env={"NEARSTORE_PROT": "5630", "NEARSTORE_ENDPOINT": "http://127.0.0.1:9000"})
    assert cfg.warnings == ["NEARSTORE_PROT is not a nearstore setting; did you mean 'NEARSTORE_PORT'?"]


def test_print_config_masks_secrets(tmp_path: Path) -> None:
    path = _file(tmp_path, "[[credentials]]\naccess_key = \"trainer\"\nsecret_key = \"hunter2-secret\"\n"
                           "[[buckets]]\nname = \"d\"\nendpoint = \"http://127.0.0.1:1\"\n"
                           "access_key = \"up\"\nsecret_key = \"upstream-secret\"\n"
                           "[cluster]\nsecret = \"cluster-secret\"\n")
    text = config.render(load(path, env={}))
    assert "hunter2" not in text and "upstream-secret" not in text and "cluster-secret" not in text
    assert 'access_key = "trainer"' in text and 'secret_key = "********"' in text and 'port = 9000' in text
    # What it prints is a configuration the node reads back unchanged.
    again = load(_file(tmp_path, text.replace('"********"', '"x"')), env={})
    assert (again.port, again.cache.size, again.upstreams[0].endpoint) == (9000, 10 << 30, "http://127.0.0.1:1")


def test_docs_config_md_is_generated_from_the_code() -> None:
    doc = Path(__file__).resolve().parents[3] / "docs" / "CONFIG.md"
    assert doc.read_text() == config.reference(), "run `make config-doc`"
    for s in config.SETTINGS:
        assert f"`{s.key}`" in doc.read_text() and f"`{s.env}`" in doc.read_text()


def _doc_tomls() -> list[tuple[str, str]]:
    import re

    root = Path(__file__).resolve().parents[3]
    out = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for i, text in enumerate(re.findall(r"^```toml\n(.*?)^```", path.read_text(), flags=re.S | re.M), 1):
            out.append((f"{path.name}#{i}", text))
    for path in sorted((root / "deploy").rglob("*.toml.example")):  # what the manifests mount
        out.append((str(path.relative_to(root)), path.read_text()))
    return out


@pytest.mark.parametrize(("where", "text"), _doc_tomls(), ids=[w for w, _ in _doc_tomls()])
def test_every_toml_example_in_the_docs_is_a_valid_configuration(tmp_path: Path, where: str, text: str) -> None:
    """A user who copies an example gets no unknown-setting error."""
    env = {"NEARSTORE_ACCESS_KEY": "a", "NEARSTORE_SECRET_KEY": "s", "NEARSTORE_NODE_ID": "10.0.0.1:9000",
           "NEARSTORE_CLUSTER_SECRET": "x"}
    cfg = load(_file(tmp_path, text), env=env)
    assert cfg.port == 9000


USERS = """
[[credentials]]
access_key = "first"
secret_key = "first-secret"

[[users]]
name = "vision"
display_name = "Vision team"
keys = [{ access_key = "v1", secret_key = "v1-secret" }, { access_key = "v2", secret_key = "v2-secret" }]

[[users]]
name = "audio"
id = "%s"
keys = [{ access_key = "a1", secret_key = "a1-secret" }]
""" % ("b" * 64)


def test_users_their_keys_and_the_first_user(tmp_path: Path) -> None:
    path = tmp_path / "n.toml"
    path.write_text(USERS + '\n[[buckets]]\nname = "ds"\nendpoint = "http://127.0.0.1:1"\nowner = "audio"\n')
    cfg = load(str(path), env={"NEARSTORE_ACCESS_KEY": "env", "NEARSTORE_SECRET_KEY": "env-secret"})
    first, vision, audio = cfg.users
    assert first.name == config.FIRST_USER and first.id == hashlib.sha256(b"env").hexdigest()
    assert first.display_name == "env"  # the environment's key comes first
    assert vision == config.User("vision", hashlib.sha256(b"vision").hexdigest(), "Vision team")
    assert audio.id == "b" * 64 and audio.display_name == "audio"
    assert {k: u.name for k, u in cfg.key_users.items()} == {
        "first": "owner", "env": "owner", "v1": "vision", "v2": "vision", "a1": "audio"}
    assert cfg.credentials["v2"] == "v2-secret" and cfg.credentials["first"] == "first-secret"
    assert cfg.user_of("a1") is audio and cfg.user_named("") is first
    assert cfg.user_named(cfg.upstreams[0].owner) is audio
    shown = config.render(cfg)
    assert 'name = "vision"' in shown and "v1-secret" not in shown and "a1-secret" not in shown
    assert shown.count("[[credentials]]") == 2  # the first user's keys only


@pytest.mark.parametrize(("extra", "message"), [
    ('[[users]]\nname = "x"\nkeys = [{ access_key = "v1", secret_key = "s" }]\n', "also user 'vision'"),
    ('[[users]]\nname = "vision"\nkeys = [{ access_key = "z", secret_key = "s" }]\n', "name is also"),
    ('[[users]]\nname = "x"\nkeys = []\n', "one or more"),
    ('[[users]]\nname = "x"\nid = "XYZ"\nkeys = [{ access_key = "z", secret_key = "s" }]\n', "64 lower-case hex"),
    ('[[users]]\nname = "owner"\nkeys = [{ access_key = "z", secret_key = "s" }]\n', "first user"),
    ('[[users]]\nname = "x"\nkeys = [{ access_key = "z" }]\n', "secret_key"),
    ('[[buckets]]\nname = "ds"\nendpoint = "http://127.0.0.1:1"\nowner = "nobody"\n', "no user named 'nobody'"),
])
def test_mistakes_in_users_are_refused(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "n.toml"
    path.write_text(USERS + "\n" + extra)
    with pytest.raises(ConfigError, match=message):
        load(str(path), env={})


def test_a_key_no_user_holds_is_nobodys(tmp_path: Path) -> None:
    path = tmp_path / "n.toml"
    path.write_text(USERS)
    cfg = load(str(path), env={})
    for key in ("", "unknown"):
        with pytest.raises(KeyError):
            cfg.user_of(key)
    from nearstore.gateway import access, errors
    from nearstore.metadata.backing import BucketAccess

    class Store:
        def bucket_access(self, bucket: str) -> BucketAccess:
            return BucketAccess()  # the first user's, private

    with pytest.raises(errors.AccessDenied):
        access.requester(cfg, "unknown", anonymous=False)  # a slip that let one through fails closed
    listing = access.Op("s3:ListBucket", permission="READ")
    with pytest.raises(errors.AccessDenied):
        access.decide(cfg, Store(), None, "b", None, listing)  # type: ignore[arg-type]
    first = access.requester(cfg, "first", anonymous=False)
    assert access.decide(cfg, Store(), first, "b", None, listing).settled  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "message"), [
    # A node serving HTTPS is reached at that port over TLS: an http:// peer
    # would fail, or reach something else in clear.
    ('[tls]\ncert = "c.pem"\nkey = "k.pem"\n[cluster]\nsecret = "s"\nnode_id = "a:1"\n'
     'peers = ["http://a:1", "https://b:1"]\n', r"peers must be https:// URLs, not \['http://a:1'\]"),
    ('[cluster]\ncert = "c.pem"\n', "cert and key go together"),
    ('[tls]\ncert = "c.pem"\nkey = "k.pem"\n[cluster]\nmtls = true\ncert = "c.pem"\nkey = "k.pem"\n',
     r"mtls needs .*\[cluster\] ca"),
    ('[cluster]\nmtls = true\nca = "ca.pem"\ncert = "c.pem"\nkey = "k.pem"\n', r"mtls needs \[tls\] cert"),
])
def test_peer_tls_settings_that_cannot_work_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(_file(tmp_path, text), env={})
