"""Bad input is a 400 (or 413), never a 5xx: the cases found by hand, then random and hostile
JSON and bytes (hypothesis) against every request decoder and every admin route of the live stack.

The property tests run in a thread with a blocking HTTP client, so the session's event loop (which
runs billing, and with it the usage service) keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import socket
import time
from urllib.parse import quote, urlsplit

import brotli
from hypothesis import HealthCheck, given, settings, strategies as st

from bus.errors import NotFound
from bus.account.tenants import Tenant
from tests.conftest import ADMIN_TOKEN, CHAT_MODEL, known_to_edge

TENANT = "hostile"
PROP_TENANT = "hostile-prop"  # the property tests may change it in any valid way: a tenant of their own
# Bounded so the whole property suite takes seconds on two cores; deadline off: the stack's
# latency is not what is under test.
PROPERTY = settings(max_examples=30, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


async def _key(stack, tenant: str = TENANT) -> tuple[str, str]:
    """An unlimited tenant (so no test here spends another's quota) and a new key of it: id and secret."""
    async def make(store):
        try:
            await store.get_tenant(tenant)
        except NotFound:
            await store.create_tenant(Tenant(id=tenant, tier="enterprise"))
        return await store.create_key(tenant, name="hostile")

    key, secret = await stack.tenancy(make)
    return key.id, await known_to_edge(stack.base_url, secret)


def _send(stack, method: str, path: str, body: bytes | None = None, token: str = ADMIN_TOKEN,
          content_type: str | None = "application/json", headers: dict | None = None) -> tuple[int, dict]:
    """One blocking HTTP request with exactly these bytes; the status and the JSON answer."""
    url = urlsplit(stack.base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", **(headers or {})}
    if content_type:
        headers["Content-Type"] = content_type
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {"raw": data[:200]}
    return resp.status, answer


def _assert_refused_cleanly(status: int, answer: dict, what) -> None:
    assert status < 500, (status, answer, what)
    if status >= 400:
        assert set(answer["error"]) == {"message", "type", "param", "code"}, answer


def _nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


def _with(template: dict, path: str, fragment: bytes) -> bytes:
    """``template`` as JSON with the value at ``path`` (dots and list indexes) replaced by raw bytes."""
    doc = json.loads(json.dumps(template))
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for p in parents:
        node = node[p]
    node[last] = "\x00HOSTILE\x00"
    return json.dumps(doc).encode().replace(b'"\\u0000HOSTILE\\u0000"', fragment)


# --- the cases found by hand -----------------------------------------------------------------

async def test_invalid_utf8_inside_a_json_string_is_a_400(stack, meter):
    _, secret = await _key(stack)
    chat = b'{"model": "%s", "messages": [{"role": "user", "content": "caf\xe9 \xff"}]}' % CHAT_MODEL.encode()
    status, body = await asyncio.to_thread(_send, stack, "POST", "/v1/chat/completions", chat, secret)
    assert status == 400 and "UTF-8" in body["error"]["message"], body
    status, body = await asyncio.to_thread(_send, stack, "PATCH", f"/admin/tenants/{TENANT}", b'{"name": "\xc0\xaf"}')
    assert status == 400 and "UTF-8" in body["error"]["message"], body


async def test_deeply_nested_arrays_are_a_400(stack, meter):
    _, secret = await _key(stack)
    deep = _nested(100_000)
    chat = _with({"model": CHAT_MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content.0.image_url.url", deep)
    status, body = await asyncio.to_thread(_send, stack, "POST", "/v1/chat/completions", chat, secret)
    # A typed field refuses the first bracket (the field is named); an untyped body, the depth.
    assert status == 400 and body["error"]["param"] == "messages[0].content[0].image_url.url", body
    status, body = await asyncio.to_thread(_send, stack, "PATCH", f"/admin/tenants/{TENANT}", b'{"name": %s}' % deep)
    assert status == 400 and "nested" in body["error"]["message"], body


async def test_integers_beyond_64_bits_are_a_400_naming_the_field(stack, meter):
    await _key(stack)
    huge = b'{"limits": {"tpm": 1000000000000000000000000000000}}'
    status, body = await asyncio.to_thread(_send, stack, "PATCH", f"/admin/tenants/{TENANT}", huge)
    assert status == 400 and body["error"]["param"] == "limits.tpm", body
    status, body = await asyncio.to_thread(_send, stack, "POST", f"/admin/tenants/{TENANT}/keys", huge)
    assert status == 400 and body["error"]["param"] == "limits.tpm", body
    status, body = await asyncio.to_thread(_send, stack, "GET", f"/admin/tenants/{TENANT}")
    assert status == 200 and body["limits"] == {}, "nothing was stored"


async def test_usage_queries_with_a_30_digit_limit_or_grouped_by_hour_with_a_start(stack, meter):
    _, secret = await _key(stack)
    status, body = await asyncio.to_thread(_send, stack, "GET", "/v1/usage?limit=" + "9" * 30, None, secret)
    assert status == 400 and body["error"]["param"] == "limit", body
    for path in ("/v1/usage?group_by=hour&start=0", "/v1/usage?group_by=day,hour&start=0&end=4000000000"):
        status, body = await asyncio.to_thread(_send, stack, "GET", path, None, secret)
        assert status == 200 and body["object"] == "list", (path, body)


async def test_a_json_route_says_so_when_sent_text(stack, meter):
    _, secret = await _key(stack)
    chat = json.dumps({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    for path, token in (("/v1/chat/completions", secret), ("/admin/tenants", ADMIN_TOKEN)):
        status, body = await asyncio.to_thread(_send, stack, "POST", path, chat, token, "text/plain")
        assert status == 400, body
        assert body["error"]["code"] == "unsupported_content_type" and "application/json" in body["error"]["message"]


async def test_a_2_mib_chat_body_reaches_the_model(stack, meter):
    """Under the edge's body limit, so the bus must carry it: the model's own answer, not a 503."""
    _, secret = await _key(stack)
    chat = json.dumps({"model": CHAT_MODEL, "max_tokens": 1,
                       "messages": [{"role": "user", "content": "hi " * (700 * 1024)}]}).encode()
    assert len(chat) > 2 * 1024 * 1024
    status, body = await asyncio.to_thread(_send, stack, "POST", "/v1/chat/completions", chat, secret)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body


async def test_a_body_whose_compression_does_not_decode_is_a_400(stack, meter):
    _, secret = await _key(stack)
    chat = json.dumps({"model": CHAT_MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).encode()
    for encoding in ("gzip", "deflate", "br"):
        status, body = await asyncio.to_thread(_send, stack, "POST", "/v1/chat/completions", b"not compressed",
                                               secret, headers={"Content-Encoding": encoding})
        assert status == 400 and body["error"]["code"] == "invalid_body", (encoding, body)
    for encoding, compress in (("gzip", gzip.compress), ("br", brotli.compress)):  # good ones are read
        status, body = await asyncio.to_thread(_send, stack, "POST", "/v1/chat/completions", compress(chat),
                                               secret, headers={"Content-Encoding": encoding})
        assert status == 200 and body["usage"]["completion_tokens"] == 1, (encoding, body)


async def test_a_form_part_that_is_itself_a_form_is_a_400(stack, meter):
    _, secret = await _key(stack)
    nested = (b"--XX\r\nContent-Disposition: form-data; name=\"file\"\r\n"
              b"Content-Type: multipart/mixed; boundary=YY\r\n\r\n--YY\r\n\r\nx\r\n--YY--\r\n--XX--\r\n")
    status, body = await asyncio.to_thread(_send, stack, "POST", "/v1/audio/transcriptions", nested, secret,
                                           "multipart/form-data; boundary=XX")
    assert status == 400 and "named field" in body["error"]["message"], body


def _trickled(stack, path: str, token: str, content_type: str, pieces: list[bytes], pause_s: float,
              promised: int) -> tuple[int, dict, float]:
    """A request whose body comes in ``pieces``, ``pause_s`` apart, under a Content-Length of
    ``promised``: the status, the answer and the wait after the last piece."""
    url = urlsplit(stack.base_url)
    head = (f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {promised}\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head)
        for piece in pieces:
            time.sleep(pause_s)
            sock.sendall(piece)
        started = time.monotonic()
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, json.loads(answer.read()), time.monotonic() - started


def _stalled(stack, path: str, token: str, content_type: str, sent: bytes) -> tuple[int, dict, float]:
    """A request that promises a longer body than it sends, then waits."""
    return _trickled(stack, path, token, content_type, [sent], 0, len(sent) + 1000)


async def test_a_body_that_stops_arriving_is_answered_408_and_the_edge_goes_on(stack, meter):
    _, secret = await _key(stack)
    idle = stack.settings.edge.body_idle_s
    for path, content_type, sent in (
            ("/v1/chat/completions", "application/json", b'{"model": "%s", "messages": [' % CHAT_MODEL.encode()),
            ("/v1/audio/transcriptions", "multipart/form-data; boundary=XX",
             b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF')):
        status, body, waited = await asyncio.to_thread(_stalled, stack, path, secret, content_type, sent)
        assert status == 408 and body["error"]["code"] == "request_timeout", (path, body)
        assert idle <= waited < idle + 10, waited
    # A slow upload that keeps sending is read to the end, however long it takes in all.
    chat = json.dumps({"model": CHAT_MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).encode()
    pieces = [chat[i:i + len(chat) // 4 + 1] for i in range(0, len(chat), len(chat) // 4 + 1)]
    status, body, _ = await asyncio.to_thread(_trickled, stack, "/v1/chat/completions", secret, "application/json",
                                              pieces, idle * 0.6, len(chat))
    assert status == 200 and len(pieces) * idle * 0.6 > 1.5 * idle, body


async def test_a_form_sent_to_a_route_that_does_not_exist_is_a_404(stack, meter):
    _, secret = await _key(stack)
    status, body = await asyncio.to_thread(_send, stack, "POST", "/v1/images/variations", b"--XX--\r\n", secret,
                                           "multipart/form-data; boundary=XX")
    assert status == 404 and body["error"]["code"] == "unknown_url", body


async def test_admin_refuses_keys_that_could_never_work(stack, meter):
    await _key(stack)
    for spec, param in (({"expires_in": -5}, "expires_in"), ({"expires_in": 1e308}, "expires_in"),
                        ({"expires_at": 1_000}, "expires_at"), ({"endpoints": ["chat.completion"]}, "endpoints")):
        status, body = await asyncio.to_thread(_send, stack, "POST", f"/admin/tenants/{TENANT}/keys",
                                               json.dumps(spec).encode())
        assert status == 400 and body["error"]["param"] == param, (spec, body)
    status, body = await asyncio.to_thread(_send, stack, "PATCH", f"/admin/tenants/{TENANT}", b'{"disabled": "yes"}')
    assert status == 400 and body["error"]["param"] == "disabled", body
    key_id, _ = await _key(stack)
    for expires in (-1, 1, 1e300):
        status, body = await asyncio.to_thread(_send, stack, "PATCH", f"/admin/keys/{key_id}",
                                               json.dumps({"expires": expires}).encode())
        assert status == 400 and body["error"]["param"] == "expires", (expires, body)
    lanes = {"allowed_lanes": ["batch"], "default_lane": "critical"}  # a default it may not use
    status, body = await asyncio.to_thread(_send, stack, "PATCH", f"/admin/tenants/{TENANT}", json.dumps(lanes).encode())
    assert status == 400 and body["error"]["param"] == "default_lane", body
    # A key of another tenant, or none, cannot carry a budget that would never apply.
    other_key, _ = await _key(stack, PROP_TENANT)
    for key, expected in ((other_key, 400), ("k" * 12, 404)):
        budget = {"tenant": TENANT, "name": "k", "amount_micros": 1, "period": "daily", "key": key}
        status, body = await asyncio.to_thread(_send, stack, "POST", "/admin/budgets", json.dumps(budget).encode())
        assert status == expected, (key, body)
    status, _ = await asyncio.to_thread(_send, stack, "DELETE", f"/admin/keys/{key_id}")
    assert status == 200
    status, body = await asyncio.to_thread(_send, stack, "PATCH", f"/admin/keys/{key_id}", b'{"name": "again"}')
    assert status == 409 and body["error"]["code"] == "key_revoked", body


# --- random and hostile input ----------------------------------------------------------------

_HUGE_INTS = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**30, -(10**30)])
_scalars = (st.none() | st.booleans() | st.integers() | _HUGE_INTS | st.floats(allow_nan=False)
            | st.text(max_size=40))
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


@st.composite
def hostile_fragments(draw) -> bytes:
    """Raw JSON text for one value: random JSON, or something built to break a decoder."""
    kind = draw(st.sampled_from(["json", "deep", "deep_object", "bad_utf8", "number", "bytes", "escape"]))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "deep":
        return _nested(draw(st.integers(1, 100_000)))
    if kind == "deep_object":
        depth = draw(st.integers(1, 5_000))
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == "bad_utf8":
        return b'"' + draw(st.binary(min_size=1, max_size=8)).replace(b'"', b"") + b'\xff"'
    if kind == "number":
        return draw(st.sampled_from([b"1e400", b"-1e400", b"1" * 40, b"-0", b"NaN", b"Infinity", b"0.1e-400"]))
    if kind == "escape":
        return draw(st.sampled_from([b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\u0000"', b'"\\x41"']))
    return draw(st.binary(max_size=64))


_CHAT = {"model": "no-such-model", "max_tokens": 5, "temperature": 0.5, "stream": False, "stop": ["x"],
         "service_tier": "default", "stream_options": {"include_usage": True},
         "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                   {"type": "image_url", "image_url": {"url": "x"}}]}]}
_LIMITS = {"rpm": 5, "tpm": 5, "concurrency": 1}
# Every route that decodes a body: a valid body to start from, and the fields a hostile value may replace.
BODY_ROUTES = {
    ("POST", "/v1/chat/completions"): (_CHAT, ["model", "messages", "messages.0", "messages.0.role",
                                               "messages.0.content", "messages.0.content.0.text",
                                               "messages.0.content.1.image_url", "messages.0.content.1.image_url.url",
                                               "max_tokens", "temperature", "stop", "stream", "service_tier",
                                               "stream_options"]),
    ("POST", "/admin/tenants"): ({"id": "hyp", "tier": "free", "limits": _LIMITS},
                                 ["id", "tier", "limits", "limits.tpm", "name"]),
    ("PATCH", "/admin/tenants/" + PROP_TENANT): ({"name": "n", "limits": _LIMITS, "model_limits": {"m": _LIMITS}},
                                            ["name", "limits", "limits.rpm", "model_limits", "model_limits.m"]),
    ("POST", f"/admin/tenants/{PROP_TENANT}/keys"): ({"name": "k", "expires_in": 60, "limits": _LIMITS, "models": ["m"]},
                                                ["name", "expires_in", "limits", "limits.concurrency", "models"]),
    ("PATCH", "/admin/keys/{key}"): ({"name": "k", "expires": 4e9, "endpoints": ["chat.completions"]},
                                     ["name", "expires", "endpoints"]),
    ("POST", f"/admin/tenants/{PROP_TENANT}/credits"): ({"amount_micros": 1, "kind": "grant", "expires_in": 60, "note": "n"},
                                                   ["amount_micros", "kind", "expires_in", "note", "id"]),
    ("POST", "/admin/budgets"): ({"tenant": PROP_TENANT, "name": "b", "amount_micros": 10, "thresholds": [50],
                                  "webhook_url": "https://hooks.example.com/h"},
                                 ["tenant", "name", "amount_micros", "period", "window_s", "thresholds", "webhook_url"]),
}


@st.composite
def hostile_bodies(draw, route) -> bytes:
    """A body for ``route``: raw bytes, random JSON, or its valid body with one field made hostile."""
    template, fields = BODY_ROUTES[route]
    kind = draw(st.sampled_from(["bytes", "json", "field", "field"]))
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    if kind == "json":
        return draw(hostile_fragments())
    return _with(template, draw(st.sampled_from(fields)), draw(hostile_fragments()))


async def test_no_body_makes_a_route_fail(stack, meter):
    key_id, secret = await _key(stack, PROP_TENANT)

    def run(route):
        method, path = route
        token = secret if path.startswith("/v1/") else ADMIN_TOKEN

        @PROPERTY
        @given(body=hostile_bodies(route), content_type=st.sampled_from(["application/json", None]))
        def prop(body, content_type):
            status, answer = _send(stack, method, path.format(key=key_id), body, token, content_type)
            _assert_refused_cleanly(status, answer, (route, body[:200]))

        prop()

    for route in BODY_ROUTES:
        await asyncio.to_thread(run, route)


_text = st.text(max_size=40) | st.sampled_from(["9" * 30, "nan", "inf", "-1", "1e400", "0x10", "hour", "day,hour",
                                                "tenant,tenant", "%", "\x00", "..", "a.b", "*", ">"])
QUERY_ROUTES = [
    ("GET", "/v1/usage?start={a}&end={b}&limit={c}&group_by={d}"),
    ("GET", "/admin/usage?tenant={a}&start={b}&group_by={c}&limit={d}"),
    ("GET", "/admin/keys?tenant={a}"),
    ("GET", "/admin/budgets?tenant={a}"),
    ("GET", "/admin/tenants/{a}"),
    ("GET", "/admin/tenants/{a}/credits"),
    ("GET", "/admin/keys/{a}"),
    ("DELETE", "/admin/budgets/{a}"),
    ("DELETE", "/admin/keys/{a}"),
    ("PATCH", "/admin/tenants/{a}"),
]


async def test_no_query_or_path_makes_a_route_fail(stack, meter):
    _, secret = await _key(stack, PROP_TENANT)

    def run(route):
        method, path = route
        token = secret if path.startswith("/v1/") else ADMIN_TOKEN
        body = b'{"name": "x"}' if method == "PATCH" else None

        @PROPERTY
        @given(values=st.lists(_text, min_size=4, max_size=4))
        def prop(values):
            a, b, c, d = (quote(v, safe="") for v in values)
            status, answer = _send(stack, method, path.format(a=a, b=b, c=c, d=d), body, token)
            _assert_refused_cleanly(status, answer, (route, values))

        prop()

    for route in QUERY_ROUTES:
        await asyncio.to_thread(run, route)
