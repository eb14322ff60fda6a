"""Property-based HTTP fuzzing of the server from its own OpenAPI schema (issue 17).

A real uvicorn server on 127.0.0.1 over a tiny random LLaMA. Request bodies are generated from the
schema the server publishes (`app.openapi()`): every field either left out, valid, of a wrong type,
an extreme number, or text drawn from all of Unicode (lone surrogates, NUL, right-to-left marks,
astral planes), plus unknown fields and bodies that are not objects or not JSON at all. Uploads are
multipart bodies built by hand (names and fields as raw, possibly invalid, UTF-8). Every route is
tried with a valid key, no key, a wrong key and a garbled header.

The property, for every case: no 5xx, no dropped connection, and every 4xx is a JSON error whose
`param` names the field at fault. Bounded: a fixed number of cases per route and a time budget
(checked per case); the number run is printed at the end of the module.
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from test_serve import BASE, World, start_server

from conftest import one_torch_thread_impl

CASES = {"completions": 800, "uploads": 250, "prefix_routes": 300, "other_routes": 80}
BUDGET_S = 45.0  # for the whole module: a case past it is counted as skipped, not run
COUNTS: dict[str, int] = {}
STARTED: list[float] = []  # when the first case ran (not at import: other files may run first)


def elapsed() -> float:
    if not STARTED:
        STARTED.append(time.monotonic())
    return time.monotonic() - STARTED[0]

one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread_impl)

FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("fuzz-prefixes"))


@pytest.fixture(scope="module")
def target(world, tmp_path_factory):
    server, store = start_server(world, tmp_path_factory.mktemp("fuzz-server"), batch_window_ms=1,
                                 max_tokens_limit=6, default_max_tokens=2, max_prompt_tokens=256,
                                 max_batch_tokens=4096, request_timeout_s=20, max_upload_mb=1)
    key = store.add_key("alice")
    store.add("p0", "bob", world.tmp / "p0.safetensors", public=True)  # alice may use it, not remove it
    client = httpx.Client(base_url=server.url, timeout=30)
    yield server, key, client, world
    client.close()
    server.stop()


def _run_case(kind: str) -> bool:
    """Count a case; False when the module's time budget is spent (the case is skipped)."""
    if elapsed() > BUDGET_S:
        COUNTS["skipped (time budget)"] = COUNTS.get("skipped (time budget)", 0) + 1
        return False
    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    return True


# -- values ----------------------------------------------------------------------------------------

SPECIAL = ["\ud800", "\udfff", "\ud83d", "\x00", "\u202e", "\u200f", "\ufeff", "\U0001F600", "\U00010348",
           "\uffff", "\n", "\r\n", "%", "'", '"', "\\", "../", "a" * 300]
text = st.one_of(st.text(st.characters(blacklist_categories=()), max_size=40),  # every code point, surrogates too
                 st.lists(st.sampled_from(SPECIAL), min_size=1, max_size=4).map("".join),
                 st.sampled_from(["", BASE, "p0", "tiny", "nope"]))
extreme_numbers = st.one_of(st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30,
                                             1e308, -1e308, 5e-324, -0.0, 0.5, 1.0000001, math.nan, math.inf,
                                             -math.inf]),
                            st.integers(), st.floats())
wrong_types = st.one_of(st.none(), st.booleans(), st.lists(st.integers(), max_size=3),
                        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def value_for(schema: dict, components: dict):
    """A strategy for one field: mostly values of its type (valid or at the edges), sometimes any type."""
    if "$ref" in schema:
        return value_for(components[schema["$ref"].split("/")[-1]], components)
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        return st.one_of([value_for(o, components) for o in options])
    kind = schema.get("type")
    if kind == "string":
        own = text
    elif kind in ("integer", "number"):
        own = extreme_numbers
    elif kind == "boolean":
        own = st.one_of(st.booleans(), st.sampled_from(["true", 1, 0, "yes"]))
    elif kind == "array":
        own = st.lists(value_for(schema.get("items", {}), components), max_size=10)
    elif kind == "object":
        own = body_for(schema, components)
    elif kind == "null":
        own = st.none()
    else:
        own = st.one_of(text, extreme_numbers, wrong_types)
    return st.one_of(own, own, own, text, extreme_numbers, wrong_types)  # 3 in 6: its own type


def body_for(schema: dict, components: dict):
    """A JSON object from an object schema: each field left out or drawn by value_for, plus unknown fields."""
    props = schema.get("properties", {})
    fields = {name: st.one_of(st.just(None).map(lambda _: _MISSING), value_for(s, components))
              for name, s in props.items()}
    extra = st.dictionaries(text, st.one_of(text, extreme_numbers, wrong_types), max_size=2)
    return st.builds(lambda chosen, more: {**more, **{k: v for k, v in chosen.items() if v is not _MISSING}},
                     st.fixed_dictionaries(fields), extra)


_MISSING = object()


def auth_header(kind: str, key: str) -> dict:
    return {"valid": {"Authorization": f"Bearer {key}"}, "none": {},
            "wrong": {"Authorization": "Bearer pt-wrong"},
            "garbled": {"Authorization": b"Bearer \xff\xfe key"},
            "scheme": {"Authorization": f"Basic {key}"}}[kind]


auths = st.sampled_from(["valid", "valid", "valid", "none", "wrong", "garbled", "scheme"])


def encode_json(body) -> bytes:
    """JSON text as a client would send it: non-ASCII and lone surrogates escaped (\\ud800), NaN as NaN."""
    return json.dumps(body, ensure_ascii=True).encode()


def check(r: httpx.Response, what) -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert r.headers.get("content-type", "").startswith("application/json"), (what, r.text[:300])
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"], (what, err)
        if r.status_code != 429:  # "busy" names no field: it is about the server, not the request
            assert isinstance(err["param"], str) and err["param"], (what, err)


def send(client: httpx.Client, method: str, url: str, what, **kw) -> httpx.Response:
    try:
        r = client.request(method, url, **kw)
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.ConnectError) as e:
        raise AssertionError(f"connection dropped: {type(e).__name__}: {e} for {what}") from None
    check(r, what)
    return r


# -- the routes ------------------------------------------------------------------------------------

def _completion_bodies():
    from prefixtune.serve.schemas import CompletionRequest

    schema = CompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    return schema, schema.get("$defs", {})


def test_the_schema_is_published(target):
    server, key, client, _ = target
    spec = client.get("/openapi.json").json()
    assert "/v1/completions" in spec["paths"] and "CompletionRequest" in spec["components"]["schemas"]


@st.composite
def completion_cases(draw):
    from prefixtune.serve.schemas import CompletionRequest

    components = {"StreamOptions": CompletionRequest.model_json_schema()["$defs"]["StreamOptions"]}
    schema = CompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    how = draw(st.sampled_from(["schema"] * 8 + ["valid-ish", "not-object", "not-json"]))
    if how == "schema":
        body = encode_json(draw(body_for(schema, components)))
    elif how == "valid-ish":  # a valid request with one field drawn from the schema
        body = {"model": draw(st.sampled_from([BASE, "p0"])), "prompt": draw(text), "max_tokens": 2, "temperature": 0}
        field = draw(st.sampled_from(sorted(schema["properties"])))
        body[field] = draw(value_for(schema["properties"][field], components))
        body = encode_json(body)
    elif how == "not-object":
        body = encode_json(draw(st.one_of(text, extreme_numbers, wrong_types)))
    else:
        body = draw(st.one_of(st.binary(max_size=60), st.just(b'{"model": "\xff\xfe", "prompt": "x"}'),
                              st.just(b'{"model": ' * 50)))
    return body, draw(auths)


@settings(FUZZ, max_examples=CASES["completions"])
@given(case=completion_cases())
def test_fuzz_completions(target, case):
    """POST /v1/completions with bodies from the schema (the model only ever sees valid requests)."""
    if not _run_case("completions"):
        return
    server, key, client, _ = target
    body, auth = case
    r = send(client, "POST", "/v1/completions", (body[:300], auth), content=body,
             headers={"Content-Type": "application/json", **auth_header(auth, key)})
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") or '"error"' in r.text, r.text[-300:]


def multipart(fields: list[tuple[str, bytes, str | None]], boundary: str = "fuzzboundary") -> bytes:
    out = b""
    for name, data, filename in fields:
        disposition = f'form-data; name="{name}"'.encode("utf-8", "surrogatepass")
        if filename is not None:
            disposition += f'; filename="{filename}"'.encode("utf-8", "surrogatepass")
        out += b"--" + boundary.encode() + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n"


@st.composite
def upload_cases(draw, files):
    name = draw(st.one_of(text, st.sampled_from(["ok-name", "p0", BASE, "a/b", "x" * 65])))
    content = draw(st.one_of(st.sampled_from(list(files.values())), st.binary(max_size=200),
                             st.sampled_from([b"\x80\x04\x95", b"PK\x03\x04", b"\x08" + b"\x00" * 7 + b"{}"])))
    public = draw(st.one_of(st.sampled_from(["true", "false"]), text))
    parts = [("name", name.encode("utf-8", "surrogatepass"), None), ("file", content, draw(text)),
             ("public", public.encode("utf-8", "surrogatepass"), None)]
    parts = draw(st.lists(st.sampled_from(parts), max_size=4))  # missing, repeated and reordered parts
    extra = draw(st.lists(st.tuples(text, st.binary(max_size=20), st.none()), max_size=1))
    kind = draw(st.sampled_from(["multipart"] * 6 + ["json", "none"]))
    return parts + extra, kind, draw(auths)


@settings(FUZZ, max_examples=CASES["uploads"])
@given(data=st.data())
def test_fuzz_uploads(target, data):
    if not _run_case("uploads"):
        return
    server, key, client, world = target
    files = {"good": world.files["p5"], "truncated": world.files["p5"][:-7]}
    parts, kind, auth = data.draw(upload_cases(files))
    headers = auth_header(auth, key)
    if kind == "multipart":
        headers["Content-Type"] = "multipart/form-data; boundary=fuzzboundary"
    elif kind == "json":
        headers["Content-Type"] = "application/json"
    r = send(client, "POST", "/v1/prefixes", ([(p[0], p[1][:40]) for p in parts], kind, auth),
             content=multipart(parts), headers=headers)
    if r.status_code == 201:  # keep the store small: remove what was added
        name = r.json()["id"]
        send(client, "DELETE", "/v1/prefixes/" + urllib.parse.quote(name, safe=""), name,
             headers=auth_header("valid", key))


@settings(FUZZ, max_examples=CASES["prefix_routes"])
@given(name=text, method=st.sampled_from(["GET", "DELETE"]), auth=auths)
def test_fuzz_prefix_routes(target, name, method, auth):
    """GET and DELETE /v1/prefixes/{name}: the name as raw (possibly invalid) UTF-8 in the path."""
    if not _run_case("prefix_routes"):
        return
    server, key, client, _ = target
    path = "/v1/prefixes/" + urllib.parse.quote(name.encode("utf-8", "surrogatepass"), safe="")
    r = send(client, method, path, (name, method, auth), headers=auth_header(auth, key))
    assert not (method == "DELETE" and r.status_code == 200 and name == "p0"), "p0 is bob's: nobody else removes it"


@settings(FUZZ, max_examples=CASES["other_routes"])
@given(route=st.sampled_from([("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"),
                              ("POST", "/v1/models"), ("PUT", "/v1/completions"), ("GET", "/v1/nope")]),
       auth=auths, junk=st.binary(max_size=50))
def test_fuzz_other_routes(target, route, auth, junk):
    if not _run_case("other_routes"):
        return
    server, key, client, _ = target
    method, path = route
    r = send(client, method, path, (route, auth), content=junk, headers=auth_header(auth, key))
    if path == "/v1/models" and method == "GET" and auth == "valid":
        assert r.status_code == 200 and any(m["id"] == "p0" for m in r.json()["data"])


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 9e-6])
def test_a_temperature_near_zero_decodes_greedily(target, temperature):
    # found by test_fuzz_completions: 5e-324 is a valid JSON number, and logits / 5e-324 overflowed to a 500
    server, key, client, world = target
    r = client.post("/v1/completions", json={"model": "p0", "prompt": "hello", "max_tokens": 4,
                                             "temperature": temperature}, headers=auth_header("valid", key))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["choices"][0]["text"] == world.reference("p0", "hello", 4)


def test_the_server_still_answers_after_the_fuzz(target, capsys):
    server, key, client, world = target
    with capsys.disabled():  # the count of generated cases, in the test output
        print("\nfuzz_http: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())) +
              f" generated cases in {elapsed():.0f} s")
    r = client.post("/v1/completions", json={"model": "p0", "prompt": "hello", "max_tokens": 4, "temperature": 0},
                    headers=auth_header("valid", key))
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == world.reference("p0", "hello", 4)
    assert sum(v for k, v in COUNTS.items() if not k.startswith("skipped")) >= 100, COUNTS
