"""Security settings, exercised for real where this machine can:

- Redis with a password (in the URL, or `redis.password`) and with TLS (rediss://, a CA to
  verify the server, a client certificate the server requires): a version is published
  and a serving follower loads it, on a private redis-server; without the password, or
  without the CA, nothing connects.
- Kafka SASL/SSL settings reach every client freshrec builds (kafka-python producers,
  consumers, admin; the trainer's confluent-kafka consumer). Tansu, the development broker,
  has no SASL or TLS listener, so no handshake is exercised here.
- No bytes from Kafka, Redis or HTTP can reach pickle, an unrestricted torch.load, eval or
  an unsafe YAML load: the source tree is checked for every such call.

The admin token of the HTTP API is checked in tests/test_api_fuzz.py.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest
import redis

from publisher.config import RedisConfig
from publisher.redis_store import RedisVersionStore
from stream.config import KafkaConfig
from tests.faults.harness import RedisServer, free_port
from tests.test_publish_and_follow import Harness, wait_until

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["freshrec", "stream", "trainer", "publisher", "serving", "ops"]
PASSWORD = "correct horse battery staple"


def publish_and_follow(redis_config: RedisConfig) -> int:
    """One version through the real publisher and a serving follower; the version served."""
    h = Harness(redis_config)
    try:
        h.train()
        version = h.publish()
        h.follower.start()
        wait_until(lambda: h.follower.current is not None and h.follower.current.version == version,
                   "the follower to load the version")
        return version
    finally:
        h.follower.stop()


# -- Redis: password ---------------------------------------------------------------------------

@pytest.fixture
def redis_with_password(tmp_path):
    server = RedisServer(tmp_path / "redis", extra=("--requirepass", PASSWORD))
    server.start(ready=lambda: _pings(server.port, password=PASSWORD))
    yield server
    server.stop()


def _pings(port: int, **options) -> bool:
    try:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, **options) as c:
            return bool(c.ping())
    except (redis.RedisError, OSError):
        return False


def test_redis_password_in_the_config_or_the_url(redis_with_password):
    port = redis_with_password.port
    assert publish_and_follow(RedisConfig(url=f"redis://127.0.0.1:{port}/0", password=PASSWORD, prefix="a")) == 1
    assert publish_and_follow(RedisConfig(url=f"redis://:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{port}/0",
                                          prefix="b")) == 1
    with pytest.raises(redis.AuthenticationError):
        RedisVersionStore(RedisConfig(url=f"redis://127.0.0.1:{port}/0", password="wrong")).head()
    with pytest.raises(redis.AuthenticationError):  # NOAUTH
        RedisVersionStore(RedisConfig(url=f"redis://127.0.0.1:{port}/0")).head()


# -- Redis: TLS --------------------------------------------------------------------------------

def _certificates(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=freshrec test CA")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext")
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.fixture
def redis_with_tls(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificates for the TLS test")
    certs = _certificates(tmp_path / "certs")
    tls_port = free_port()
    tls = {"ssl": True, "ssl_ca_certs": str(certs["ca.crt"]), "ssl_certfile": str(certs["client.crt"]),
           "ssl_keyfile": str(certs["client.key"]), "password": PASSWORD}
    server = RedisServer(tmp_path / "redis", extra=(
        "--port", "0", "--tls-port", str(tls_port), "--tls-cert-file", str(certs["server.crt"]),
        "--tls-key-file", str(certs["server.key"]), "--tls-ca-cert-file", str(certs["ca.crt"]),
        "--tls-auth-clients", "yes", "--requirepass", PASSWORD))
    server.start(ready=lambda: _pings(tls_port, **tls))  # fails loudly if this redis-server has no TLS
    yield tls_port, certs
    server.stop()


def test_redis_over_tls_with_a_client_certificate(redis_with_tls):
    port, certs = redis_with_tls
    config = RedisConfig(url=f"rediss://127.0.0.1:{port}/0", password=PASSWORD, ssl_ca_certs=str(certs["ca.crt"]),
                         ssl_certfile=str(certs["client.crt"]), ssl_keyfile=str(certs["client.key"]))
    assert publish_and_follow(config) == 1
    # A server nobody vouched for (no CA given: the system's CAs do not know it) is refused.
    unverified = config.model_copy(update={"ssl_ca_certs": None})
    with pytest.raises(redis.ConnectionError):
        RedisVersionStore(unverified).head()
    # The server requires a client certificate.
    anonymous = config.model_copy(update={"ssl_certfile": None, "ssl_keyfile": None})
    with pytest.raises(redis.ConnectionError):
        RedisVersionStore(anonymous).head()
    # Plain text to the TLS port gets nowhere.
    with pytest.raises(redis.ConnectionError):
        RedisVersionStore(RedisConfig(url=f"redis://127.0.0.1:{port}/0", password=PASSWORD)).head()


# -- Kafka: SASL / SSL pass-through --------------------------------------------------------------

SECURE = KafkaConfig(bootstrap_servers="b1:9094,b2:9094", security_protocol="SASL_SSL",
                     sasl_mechanism="SCRAM-SHA-512", sasl_username="trainer", sasl_password="s3cret",
                     ssl_cafile="/etc/kafka/ca.pem", ssl_certfile="/etc/kafka/client.pem",
                     ssl_keyfile="/etc/kafka/client.key")


def test_kafka_security_settings_reach_the_kafka_python_clients(monkeypatch):
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    kw = SECURE.client_kwargs()
    assert kw == {"bootstrap_servers": ["b1:9094", "b2:9094"], "security_protocol": "SASL_SSL",
                  "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "trainer",
                  "sasl_plain_password": "s3cret", "ssl_cafile": "/etc/kafka/ca.pem",
                  "ssl_certfile": "/etc/kafka/client.pem", "ssl_keyfile": "/etc/kafka/client.key"}
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):  # every name is one the client knows
        assert set(kw) <= set(client.DEFAULT_CONFIG), client.__name__
    # The producer freshrec uses builds its client from them.
    import stream.producer

    seen = {}

    class FakeProducer:
        def __init__(self, **config):
            seen.update(config)

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(stream.producer, "KafkaProducer", FakeProducer)
    stream.producer.produce(SECURE, [])
    assert {k: seen[k] for k in kw} == kw


def test_kafka_security_settings_reach_the_trainers_confluent_consumer(monkeypatch):
    confluent_kafka = pytest.importorskip("confluent_kafka")
    from trainer.source import _ConfluentReader

    seen = {}
    monkeypatch.setattr(confluent_kafka, "Consumer", lambda conf: seen.update(conf))
    _ConfluentReader(SECURE)
    assert {k: seen[k] for k in ("bootstrap.servers", "security.protocol", "sasl.mechanism", "sasl.username",
                                 "sasl.password", "ssl.ca.location", "ssl.certificate.location",
                                 "ssl.key.location")} == {
        "bootstrap.servers": "b1:9094,b2:9094", "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "trainer", "sasl.password": "s3cret", "ssl.ca.location": "/etc/kafka/ca.pem",
        "ssl.certificate.location": "/etc/kafka/client.pem", "ssl.key.location": "/etc/kafka/client.key"}


def test_secrets_come_from_the_environment(monkeypatch):
    from freshrec.settings import Settings

    monkeypatch.delenv("FRESHREC_CONFIG", raising=False)
    monkeypatch.setenv("FRESHREC_KAFKA__SASL_PASSWORD", "from-env")
    monkeypatch.setenv("FRESHREC_REDIS__PASSWORD", "redis-from-env")
    monkeypatch.setenv("FRESHREC_SERVING__ADMIN_TOKEN", "token-from-env")
    s = Settings()
    assert (s.kafka.sasl_password, s.redis.password, s.serving.admin_token) == (
        "from-env", "redis-from-env", "token-from-env")


# -- nothing untrusted is ever deserialised into code ----------------------------------------------

def _call_name(node: ast.Call) -> str:
    parts = []
    f = node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _unsafe(node: ast.AST) -> str | None:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
        bad = [n for n in names if n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal",
                                                            "shelve", "joblib")]
        return f"imports {bad}" if bad else None
    if not isinstance(node, ast.Call):
        return None
    name = _call_name(node)
    last = name.rsplit(".", 1)[-1]
    if name in ("eval", "exec", "compile", "__import__"):
        return f"{name}()"
    if last in ("load", "loads") and name.split(".")[0] in ("pickle", "marshal", "dill", "cloudpickle", "joblib"):
        return f"{name}()"
    if last == "Unpickler":
        return f"{name}()"
    if name.endswith("torch.load") or name == "torch.load":
        flag = _keyword(node, "weights_only")
        if not (isinstance(flag, ast.Constant) and flag.value is True):
            return "torch.load() without weights_only=True"
    if name in ("yaml.load", "yaml.load_all"):
        loader = _keyword(node, "Loader")
        loader_name = ast.unparse(loader) if loader is not None else ""
        if "SafeLoader" not in loader_name:
            return f"{name}() without a SafeLoader"
    if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
        return f"{name}()"
    if last == "load" and name.split(".")[0] in ("np", "numpy"):
        flag = _keyword(node, "allow_pickle")
        if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
            return "numpy.load(allow_pickle=...)"
    return None


def test_no_source_file_can_unpickle_or_evaluate_untrusted_bytes():
    findings = []
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 30, "the source tree was not found"
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            why = _unsafe(node)
            if why:
                findings.append(f"{path.relative_to(ROOT)}:{node.lineno}: {why}")
    assert findings == [], "\n".join(findings)


def test_the_checker_finds_what_it_looks_for():
    bad = ["import pickle", "from pickle import loads", "pickle.loads(b)", "torch.load(f)",
           "torch.load(f, weights_only=False)", "eval(s)", "yaml.load(s)", "yaml.load(s, Loader=yaml.Loader)",
           "yaml.unsafe_load(s)", "np.load(f, allow_pickle=True)", "exec(code)"]
    good = ["torch.load(f, weights_only=True)", "yaml.safe_load(s)", "yaml.load(s, Loader=yaml.SafeLoader)",
            "np.load(f)", "np.frombuffer(b, dtype=np.float32)", "orjson.loads(b)", "model.eval()"]
    for src in bad:
        assert any(_unsafe(n) for n in ast.walk(ast.parse(src))), src
    for src in good:
        assert not any(_unsafe(n) for n in ast.walk(ast.parse(src))), src
