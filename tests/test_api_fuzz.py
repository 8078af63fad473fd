"""The HTTP API under hostile input: schemathesis generates requests from the OpenAPI schema
the node serves (valid and invalid bodies, headers, parameters) against a real node on
loopback with a version loaded; no answer may be a 5xx. Oversized bodies are refused with a
413 (declared length, chunked without a length, too many examples), and the admin
endpoints refuse requests without a valid bearer token.
"""

from __future__ import annotations

import socket
from collections import Counter
import uuid

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error

from publisher.config import RedisConfig
from tests.test_serving_http import Node, Trainer

TOKEN = "fuzz-admin-token"
MAX_BODY = 64 * 1024
MAX_EXAMPLES = 100


class Served:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.base = f"http://127.0.0.1:{node.port}"


@pytest.fixture(scope="module")
def served(stack):
    """One node for the module (uvicorn in a thread), with versions published under a prefix of its own."""
    config = RedisConfig(url=stack.redis_url, prefix=f"freshrec-fuzz-{uuid.uuid4().hex}", model="m")
    trainer = Trainer(config)
    for _ in range(2):
        trainer.step()
    with Node(config, admin_token=TOKEN, max_body_bytes=MAX_BODY, max_examples=64) as node:
        node.wait_version(2)
        yield Served(node)
    client = redis.Redis.from_url(config.url)
    keys = list(client.scan_iter(match=f"{config.prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def served_schema(served):
    return schemathesis.openapi.from_url(f"{served.base}/openapi.json")


def test_no_generated_request_gets_a_server_error(served, served_schema):
    """Every operation of the served schema, up to MAX_EXAMPLES valid and MAX_EXAMPLES invalid
    generated cases each (schemathesis' strategies driven by hypothesis directly: its pytest
    plugin fails under pytest 9 with "'Function' object has no attribute '_nodeid'")."""
    operations = [result.ok() for result in served_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/predict", "/model", "/readyz", "/admin/pin"}
    calls = 0
    seen: Counter = Counter()
    for operation, mode in [(op, mode) for op in operations for mode in schemathesis.GenerationMode]:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            nonlocal calls
            response = case.call_and_validate(base_url=served.base, checks=[not_a_server_error], timeout=30)
            seen[(case.method, case.path, response.status_code)] += 1
            calls += 1
            if case.path.startswith("/admin"):  # and with the token, so the handlers themselves are fuzzed
                response = case.call_and_validate(base_url=served.base, headers={"Authorization": f"Bearer {TOKEN}"},
                                                  checks=[not_a_server_error], timeout=30)
                seen[(case.method, case.path + " (token)", response.status_code)] += 1
                calls += 1

        try:
            fuzz()
        except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
            assert mode is schemathesis.GenerationMode.NEGATIVE
    assert calls >= len(operations)
    print("generated requests by answer:", dict(seen))
    assert served.node.http.get("/healthz").status_code == 200


def test_oversized_bodies_are_refused(served):
    http = served.node.http
    example = {"I1": 1, "C1": "a"}
    big = b'{"examples": [' + b",".join([b'{"C1": "' + b"x" * 1000 + b'"}'] * 80) + b"]}"
    assert len(big) > MAX_BODY
    declared = http.post("/predict", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413

    def chunks():  # no content-length: the node counts as it reads
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    streamed = http.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert http.post("/predict", json={"examples": [example] * 65}).status_code == 413
    assert http.post("/predict", json={"context": example, "candidates": [example] * 65}).status_code == 413
    # A declared length far over the limit is refused on the header, before any body is read.
    with socket.create_connection(("127.0.0.1", served.node.port), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 999999999999\r\n\r\n{")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    # Deep nesting, not UTF-8, not JSON: 4xx, never 5xx.
    for body in (b"[" * 100_000, b"\xff\xfe", b"nan", b'{"examples": [' + b"{}," * 10 + b"{}]}"):
        r = http.post("/predict", content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 or r.status_code == 200, (body[:20], r.status_code)
    assert http.get("/readyz").status_code == 200  # and the node is fine afterwards


def test_admin_endpoints_need_a_valid_token(served, served_schema):
    admin = [(method.upper(), path) for path, item in served_schema.raw_schema["paths"].items()
             if path.startswith("/admin") for method in item]
    assert {p for _, p in admin} == {"/admin/versions", "/admin/pin", "/admin/rollback", "/admin/unpin"}
    http = served.node.http
    for method, path in admin:
        body = {"json": {"version": 1}} if method == "POST" else {}
        assert http.request(method, path, **body).status_code == 401, path
        assert http.request(method, path, headers={"Authorization": f"Basic {TOKEN}"}, **body).status_code == 401
        assert http.request(method, path, headers={"Authorization": "Bearer"}, **body).status_code == 401
        assert http.request(method, path, headers={"Authorization": "Bearer wrong"}, **body).status_code == 403
        assert http.request(method, path, headers={"Authorization": f"Bearer {TOKEN}x"}, **body).status_code == 403
    ok = http.get("/admin/versions", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["retained"]


def test_admin_refuses_a_missing_token_before_looking_at_the_body(served):
    http = served.node.http
    assert http.post("/admin/pin", json={"version": "not a number"}).status_code == 401
    assert http.post("/admin/rollback", content=b"{", headers={"content-type": "application/json"}).status_code == 401
