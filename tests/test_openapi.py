"""The OpenAPI document: it lists exactly the app's routes, and it is well formed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import msgspec
from aiohttp.test_utils import TestClient

from conversations import connections
from handlers.app import Settings, create_app
from handlers.openapi import CONNECTION_NAME, document
from tests.openapi_schema import FORMATS, KEYWORDS, resolve, schema_keywords

METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def _app_routes() -> set[tuple[str, str]]:
    app = create_app(Settings(database_url="postgresql://unused.invalid/convstore"))
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    # aiohttp answers HEAD on every GET route with the GET handler (and no body): HEAD is
    # implied by GET, as HTTP says, so it is not listed separately.
    gets = {path for method, path in routes if method == "get"}
    heads = {path for method, path in routes if method == "head"}
    assert heads <= gets
    return {(method, path) for method, path in routes if method != "head"}


def _operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            assert method in METHODS, f"{path}: {method!r} is not an HTTP method"
            yield path, method, operation


def test_document_lists_exactly_the_apps_routes() -> None:
    documented = {(method, path) for path, method, _ in _operations()}
    routes = _app_routes()
    assert routes - documented == set(), "routes the OpenAPI document does not describe"
    assert documented - routes == set(), "documented routes the app does not register"


async def test_openapi_json_serves_the_document(http: TestClient[Any, Any]) -> None:
    response = await http.get("/openapi.json")
    assert response.status == 200 and response.content_type == "application/json"
    assert await response.json() == msgspec.json.decode(msgspec.json.encode(document()))


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_every_reference_resolves_and_every_component_is_used() -> None:
    doc = document()
    for ref in set(_refs(doc)):
        resolve(doc, {"$ref": ref})
    used: set[str] = set()
    todo = [ref for ref in _refs(doc["paths"])]
    while todo:
        ref = todo.pop()
        if ref in used:
            continue
        used.add(ref)
        todo.extend(_refs(resolve(doc, {"$ref": ref})))
    for kind, components in doc["components"].items():
        if kind == "securitySchemes":
            continue
        unused = {f"#/components/{kind}/{name}" for name in components} - used
        assert unused == set(), f"components no operation uses: {sorted(unused)}"


def test_operations_are_well_formed() -> None:
    doc = document()
    schemes = doc["components"]["securitySchemes"]
    ids = [operation["operationId"] for _, _, operation in _operations()]
    assert len(ids) == len(set(ids))
    for path, method, operation in _operations():
        where = f"{method.upper()} {path}"
        params = [resolve(doc, p) for p in operation.get("parameters", ())]
        keys = [(p["name"], p["in"]) for p in params]
        assert len(keys) == len(set(keys)), where
        in_path = {p["name"] for p in params if p["in"] == "path"}
        assert in_path == set(re.findall(r"{([^}]+)}", path)), where
        assert all(p["required"] for p in params if p["in"] == "path"), where
        assert all(p["in"] in ("path", "query", "header", "cookie") for p in params), where
        # OpenAPI ignores header parameters with these names: they belong elsewhere.
        assert not {"accept", "content-type", "authorization"} & {
            p["name"].lower() for p in params if p["in"] == "header"
        }, where
        assert "security" in operation, f"{where}: say which security applies, even none"
        for requirement in operation["security"]:
            assert set(requirement) <= set(schemes), where
        assert operation["responses"], where
        for status, response in operation["responses"].items():
            assert re.fullmatch(r"[1-5][0-9][0-9]", status), f"{where}: {status}"
            assert resolve(doc, response)["description"], f"{where}: {status}"
        if method in ("get", "delete"):
            assert "requestBody" not in operation, where


def _schemas(doc: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for name, schema in doc["components"]["schemas"].items():
        yield f"schemas/{name}", schema
    for kind in ("parameters", "headers"):
        for name, item in doc["components"][kind].items():
            yield f"{kind}/{name}", item["schema"]
    for path, method, operation in _operations():
        for key in ("requestBody",):
            for media, content in operation.get(key, {}).get("content", {}).items():
                yield f"{method} {path} {media}", content["schema"]
        for status, response in operation["responses"].items():
            for media, content in resolve(doc, response).get("content", {}).items():
                yield f"{method} {path} {status} {media}", content["schema"]


def test_schemas_stay_in_the_subset_the_tests_check() -> None:
    """The fuzz test validates and generates this subset of JSON Schema: a keyword outside it
    would be silently ignored, so the document may not use one."""
    doc = document()
    for where, schema in _schemas(doc):
        assert schema_keywords(schema) <= KEYWORDS, where
        for fmt in re.findall(r"'format': '([^']+)'", repr(schema)):
            assert fmt in FORMATS, where


def test_connection_names_are_the_registrys() -> None:
    # The registry matches its pattern whole (fullmatch); JSON Schema patterns search, so the
    # document anchors the same one. (ECMA's "$" ends the string; Python's would also allow
    # a trailing newline, which is why the registry does not use it.)
    assert CONNECTION_NAME == "^" + connections._NAME.pattern + "$"
