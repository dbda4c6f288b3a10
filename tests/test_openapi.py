"""GET /openapi.json: an OpenAPI 3.1 document of the routes served, checked by a real validator
(openapi-spec-validator), and the server's real answers checked against it (jsonschema)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from openapi_spec_validator import validate

from aioserver import create_app, load_config
from aioserver.openapi import document

from conftest import TOKEN, TOKEN_HASH, ClientFactory, Server

SCOPED = "scoped-token-7a8c0d21"  # may run echo only
DOCS = "docs-token-4e5f1b3c"  # may read the document only
SOME = "some-token-0b9d6a77"  # may run echo, call /segment and read the document
STAR = "star-token-5c2e8f10"  # may run a workflow named "*" and read the document
WORKFLOWS = """
workflow:
  echo: {tasks: [echo]}
  shout: {tasks: [upper]}
  w-3: {tasks: [echo]}
"""
CONFIG = f"""
segmentation: {{lines: true}}
summary: {{}}
extensions: [sample_metrics.items]
{WORKFLOWS}
auth:
  tokens:
    - {{name: admin, sha256: {TOKEN_HASH}}}
    - {{name: scoped, sha256: {hashlib.sha256(SCOPED.encode()).hexdigest()}, workflows: [echo]}}
    - {{name: docs, sha256: {hashlib.sha256(DOCS.encode()).hexdigest()}, workflows: [/openapi.json]}}
    - {{name: some, sha256: {hashlib.sha256(SOME.encode()).hexdigest()}, workflows: [echo, /segment, /openapi.json]}}
    - {{name: star, sha256: {hashlib.sha256(STAR.encode()).hexdigest()}, workflows: ["*", /openapi.json]}}
"""


def schema(doc: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    """The JSON schema of an answer, as the document gives it, its references resolved."""
    answer = doc["paths"][path][method]["responses"][str(status)]
    found: dict[str, Any] = answer["content"]["application/json"]["schema"]
    return {**found, "$defs": doc["components"]["schemas"]}


def check(doc: dict[str, Any], path: str, method: str, status: int, answer: Any) -> None:
    """The answer is one the document describes (its $refs point at its components)."""
    text = json.dumps(schema(doc, path, method, status)).replace("#/components/schemas/", "#/$defs/")
    jsonschema.Draft202012Validator(json.loads(text)).validate(answer)


async def test_the_document_of_a_server(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(CONFIG)
    with Server("--config", str(path)) as server:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as session:
            # Authorized like every route: no token, 401; a scoped token whose list lacks it, 403.
            async with session.get("/openapi.json") as response:
                assert response.status == 401
            async with session.get("/openapi.json", headers={"Authorization": f"Bearer {SCOPED}"}) as response:
                assert response.status == 403
            # A scoped token is shown what it may call, no more than its 403s would tell it.
            async with session.get("/openapi.json", headers={"Authorization": f"Bearer {DOCS}"}) as response:
                assert response.status == 200
                doc = await response.json()
            validate(doc)
            assert set(doc["paths"]) == {"/health", "/ready", "/openapi.json"}
            async with session.get("/openapi.json", headers={"Authorization": f"Bearer {SOME}"}) as response:
                doc = await response.json()
            validate(doc)
            assert set(doc["paths"]) == {"/health", "/ready", "/openapi.json", "/workflow", "/segment"}
            body = doc["paths"]["/workflow"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            assert body["properties"]["name"]["enum"] == ["echo"]
            async with session.get("/openapi.json", headers={"Authorization": f"Bearer {STAR}"}) as response:
                doc = await response.json()
            assert set(doc["paths"]) == {"/health", "/ready", "/openapi.json"}
            admin = {"Authorization": f"Bearer {TOKEN}"}
            async with session.get("/openapi.json", headers=admin) as response:
                assert response.status == 200
                assert response.content_type == "application/json"
                doc = await response.json()
            validate(doc)  # raises when it is not a valid OpenAPI 3.1 document
            assert doc["openapi"] == "3.1.0"
            # The routes served, and only those: no textractor section, no /textract.
            assert {path: sorted(ops) for path, ops in doc["paths"].items()} == {
                "/health": ["get", "head"],
                "/ready": ["get", "head"],
                "/workflow": ["post"],
                "/segment": ["get"],
                "/batchsegment": ["post"],
                "/summary": ["get"],
                "/batchsummary": ["post"],
                "/items/{id}": ["get", "head"],
                "/openapi.json": ["get", "head"],
            }
            workflow = doc["paths"]["/workflow"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            assert workflow["properties"]["name"]["enum"] == ["echo", "shout", "w-3"]
            assert doc["components"]["securitySchemes"] == {
                "bearer": {"type": "http", "scheme": "bearer", "description": ANY_DESCRIPTION}
            }
            assert doc["security"] == [{"bearer": []}]
            assert doc["paths"]["/health"]["get"]["security"] == []
            assert "security" not in doc["paths"]["/segment"]["get"]  # the document's: the bearer token
            assert doc["paths"]["/items/{id}"]["get"]["parameters"][0]["name"] == "id"
            assert "version" in doc["info"] and "aioserver" not in doc["info"]["version"]

            # The server's answers are the ones the document describes.
            answers = [
                ("POST", "/workflow", {"name": "shout", "elements": ["a"]}, {}, 200),
                ("POST", "/workflow", {"name": "nope", "elements": []}, {}, 404),
                ("POST", "/workflow", {"name": "echo"}, {}, 400),
                ("GET", "/segment", None, {"text": "a\nb"}, 200),
                ("POST", "/batchsegment", ["a\nb", "c"], {}, 200),
                ("GET", "/summary", None, {"text": "One. Two.", "maxlength": "3"}, 200),
                ("POST", "/batchsummary", {"texts": ["One. Two."], "minlength": None}, {}, 200),
                ("POST", "/batchsummary", {"texts": [1]}, {}, 400),
                ("GET", "/health", None, {}, 200),
            ]
            for method, route, body, params, status in answers:
                async with session.request(method, route, json=body, params=params, headers=admin) as response:
                    assert response.status == status
                    check(doc, route, method.lower(), status, await response.json())
            async with session.get("/segment", params={"text": "a"}) as response:
                assert response.status == 401
                check(doc, "/segment", "get", 401, await response.json())


class _Any:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)


ANY_DESCRIPTION = _Any()


async def test_an_open_server_documents_no_security(make_client: ClientFactory) -> None:
    client = await make_client("textractor: {}\n" + WORKFLOWS)
    response = await client.get("/openapi.json")
    assert response.status == 200
    doc = await response.json()
    validate(doc)
    assert "security" not in doc and "securitySchemes" not in doc["components"]
    assert "401" not in doc["paths"]["/workflow"]["post"]["responses"]
    assert set(doc["paths"]) == {
        "/health",
        "/ready",
        "/workflow",
        "/textract",
        "/batchtextract",
        "/openapi.json",
    }


@pytest.mark.parametrize(
    ("section", "result"),
    [
        ("segmentation: {}", {"type": "string"}),
        ("segmentation: {paragraphs: true}", {"type": "array", "items": {"type": "string"}}),
        ("segmentation: {paragraphs: true, join: true}", {"type": "string"}),
        ("segmentation: {minlength: 3}", {"type": ["string", "null"], "description": "null: shorter than minlength"}),
        ("segmentation: {minlength: 3, cleantext: false}", {"type": "string"}),
        ("textractor: {sentences: true}", {"type": "array", "items": {"type": "string"}}),
        ("summary: {}", {"type": "string"}),
    ],
)
def test_a_pipelines_answer_as_its_section_configures_it(section: str, result: dict[str, Any]) -> None:
    config = load_config(section + "\n")
    doc = document(create_app(config), config)
    validate(doc)
    (path,) = [p for p in doc["paths"] if p.startswith("/batch")]
    single = "/" + {"/batchsegment": "segment", "/batchtextract": "textract", "/batchsummary": "summary"}[path]
    assert schema(doc, single, "get", 200) == {**result, "$defs": doc["components"]["schemas"]}
    assert schema(doc, path, "post", 200)["items"] == result


def test_metrics_and_no_workflows() -> None:
    config = load_config("server: {metrics: true}\n")
    doc = document(create_app(config), config)
    validate(doc)
    assert "/metrics" in doc["paths"]
    assert (
        "enum"
        not in doc["paths"]["/workflow"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"][
            "name"
        ]
    )
