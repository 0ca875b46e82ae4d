"""The tenant's OpenAPI 3.1 document and the reference page, on SQLite and PostgreSQL.

The document must describe the real behaviour: it validates as OpenAPI 3.1,
every JSON Schema inside it is valid, the records the API returns validate
against it, and schemathesis — generating requests from the document and
checking every answer against it — finds no server error and no answer the
document does not describe.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import jsonschema
import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate as validate_openapi
from schemathesis import checks as st_checks

from metacrm.runtime import metastore, tenancy
from metacrm.runtime.platform import Platform

from ...conftest import BACKENDS, make_settings
from .test_api_meta import Api, build_app, make_tenant, private_control_database, problem

#: Examples per operation and generation mode: about 80 operations, two backends.
MAX_EXAMPLES = 4


@dataclass
class World:
    """One core tenant with records, another with a richer bundle, and the app."""

    app: Flask
    core: Api
    rich: Api
    ids: dict[str, str]


def _records(api: Api) -> str:
    return f"/t/{api.slug}/api/v1/records"


def _create(api: Api, entity: str, body: dict[str, Any]) -> dict[str, Any]:
    response = api.client.post(
        f"{_records(api)}/{entity}", json=body, headers=api.headers(api_auth(api))
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def api_auth(api: Api) -> str:
    return f"Bearer {api.token}"


def _seed(api: Api) -> dict[str, str]:
    """Give every core entity records with most fields set, so answers have real data."""
    customer = _create(
        api,
        "customer",
        {
            "name": "上海华联贸易有限公司",
            "kind": "company",
            "industry": "retail",
            "tags": ["重点", "vip"],
            "lifetime_value": "123456.78",
            "phone": "+86 21 5555 0101",
            "email": "info@hualian.example",
            "website": "https://hualian.example",
            "last_contacted_at": "2024-05-01T09:30:00+08:00",
            "next_follow_up_on": "2024-06-01",
        },
    )
    contact = _create(
        api, "contact", {"name": "王芳", "customer": customer["id"], "is_primary": True}
    )
    deal = _create(
        api,
        "deal",
        {
            "name": "年度采购",
            "customer": customer["id"],
            "primary_contact": contact["id"],
            "amount": 99000,
            "probability": "35.5",
            "products": ["ERP"],
        },
    )
    interaction = _create(
        api,
        "interaction",
        {
            "subject": "电话回访",
            "occurred_at": "2024-05-02T10:00:00Z",
            "customer": customer["id"],
            "related_to": {"entity": "deal", "id": deal["id"]},
            "duration_minutes": 15,
        },
    )
    task = _create(
        api,
        "task",
        {
            "subject": "发送报价",
            "related_to": {"entity": "customer", "id": customer["id"]},
            "due_on": "2024-06-02",
            "assignee": str(api.admin.id),
        },
    )
    deleted = _create(api, "customer", {"name": "回收站里的客户"})
    response = api.client.delete(
        f"{_records(api)}/customer/{deleted['id']}", headers=api.headers(api_auth(api))
    )
    assert response.status_code == 204
    return {
        "customer": customer["id"],
        "contact": contact["id"],
        "deal": deal["id"],
        "interaction": interaction["id"],
        "task": task["id"],
    }


def _rich_bundle() -> dict[str, Any]:
    """The core bundle plus one field of every kind the core lacks."""
    bundle = copy.deepcopy(tenancy.template_bundle("core"))
    customer = next(e for e in bundle["entities"] if e["name"] == "customer")

    def field(name: str, kind: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "type": kind, "label": {"en": name.title()}, **extra}

    customer["fields"] += [
        field("code", "text", max_length=12, pattern="[A-Z]{2}[0-9]+", unique=True),
        field("secret", "encrypted_text"),
        field("partners", "many_to_many", target="contact"),
        field("extra", "json"),
        field("attachment", "file"),
        field("flags", "multi_select", options=[{"value": "a", "label": {"en": "A"}}]),
        field("ratio", "decimal", precision=10, scale=6),
        field("visits", "integer", min=0, max=100, required=True, default=0),
        field("double_value", "formula", expression="lifetime_value * 2", result_type="decimal"),
        field("is_big", "formula", expression="lifetime_value > 1000", result_type="boolean"),
        field("name_length", "formula", expression="len(name)", result_type="integer"),
        field("follow_up", "formula", expression="next_follow_up_on", result_type="date"),
    ]
    bundle["settings"]["require_if_match"] = True
    return bundle


@pytest.fixture(scope="module", params=BACKENDS)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    with private_control_database(request.param) as database:
        folder = tmp_path_factory.mktemp("openapi")
        the_settings = make_settings(request.param, folder, request, **database)
        p = Platform(the_settings)
        p.init_control()
        try:
            with build_app(the_settings) as app:
                core = make_tenant(p, app)
                ids = _seed(core)
                rich = make_tenant(p, app)
                metastore.publish(p.store(rich.tenant), _rich_bundle(), expected_version=1)
                yield World(app, core, rich, ids)
        finally:
            for item in tenancy.list_tenants(p):
                tenancy.delete_tenant(p, item.slug)
            p.close()


def _document(api: Api) -> dict[str, Any]:
    response = api.client.get(
        f"/t/{api.slug}/api/v1/openapi.json", headers=api.headers(api_auth(api))
    )
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/json"
    return response.get_json()


# -- the document ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["core", "rich"])
def test_document_is_valid_openapi_31(world, which):
    doc = _document(getattr(world, which))
    assert doc["openapi"] == "3.1.0"
    validate_openapi(doc)


@pytest.mark.parametrize("which", ["core", "rich"])
def test_every_schema_in_the_document_is_valid_json_schema(world, which):
    doc = _document(getattr(world, which))
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema({**schema, "components": doc["components"]})


def test_document_describes_every_entity_and_operation(world):
    doc = _document(world.core)
    paths = doc["paths"]
    for entity in ("customer", "contact", "deal", "interaction", "task"):
        base = f"/records/{entity}"
        assert set(paths[base]) == {"get", "post"}
        assert set(paths[f"{base}/count"]) == {"get"}
        assert {"get", "patch", "delete"} <= set(paths[f"{base}/{{id}}"])
        assert "post" in paths[f"{base}/{{id}}/restore"]
        assert "delete" in paths[f"{base}/{{id}}/purge"]
        assert {"post", "patch"} <= set(paths[f"{base}/bulk"])
        assert "post" in paths[f"{base}/bulk/delete"]
    assert "/records/customer/{id}/related/deal" in paths
    assert "/records/customer/{id}/related/task" in paths  # through related_to
    assert "/records/task/{id}/related/customer" not in paths
    assert doc["servers"] == [{"url": f"/t/{world.core.slug}/api/v1"}]
    bearer = doc["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert doc["security"] == [{"bearer": []}]


def test_every_error_answer_is_a_problem_document(world):
    doc = _document(world.core)
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            assert "401" in operation["responses"], (path, method)
            for status, response in operation["responses"].items():
                if status.startswith("4"):
                    ref = response["$ref"].rsplit("/", 1)[-1]
                    content = doc["components"]["responses"][ref]["content"]
                    assert list(content) == ["application/problem+json"]


def test_record_schema_maps_field_types(world):
    schemas = _document(world.rich)["components"]["schemas"]
    record = schemas["customer.Record"]["properties"]
    create = schemas["customer.Create"]
    patch = schemas["customer.Patch"]
    for name in ("id", "version", "created_at", "deleted_at", "owner_id"):
        assert record[name]["readOnly"] is True
        assert name not in create["properties"]
    assert record["id"]["format"] == "uuid"
    assert record["lifetime_value"]["type"] == ["string", "null"]
    assert "pattern" in record["lifetime_value"]
    assert record["next_follow_up_on"]["format"] == "date"
    assert record["last_contacted_at"]["format"] == "date-time"
    assert record["status"]["enum"][:2] == ["prospect", "active"]
    assert record["tags"]["type"] == ["array", "null"]
    assert record["partners"]["items"]["format"] == "uuid"
    assert record["secret"]["enum"] == ["********", None]
    assert record["double_value"]["readOnly"] is True
    assert record["is_big"]["type"] == ["boolean", "null"]
    assert "double_value" not in create["properties"]
    assert create["additionalProperties"] is False
    assert patch["additionalProperties"] is False
    assert create["required"] == ["name"]  # visits has a default
    assert "required" not in patch
    assert create["properties"]["name"]["minLength"] == 1
    assert create["properties"]["code"]["pattern"] == "^$|^(?:[A-Z]{2}[0-9]+)$"
    assert create["properties"]["visits"]["minimum"] == 0
    related = schemas["task.Record"]["properties"]["related_to"]
    assert related["properties"]["entity"]["enum"] == ["customer", "contact", "deal", "interaction"]
    deal_create = schemas["deal.Create"]
    assert deal_create["properties"]["customer"]["format"] == "uuid"
    assert "number" not in deal_create["properties"]  # auto-number
    assert set(deal_create["required"]) == {"name", "customer"}


def test_returned_records_validate_against_the_document(world):
    """Read every seeded record and page through the API: each answer fits its schema."""
    api = world.core
    doc = _document(api)
    headers = api.headers(api_auth(api))

    def check(schema_name: str, instance: Any) -> None:
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
        jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)

    for entity, record_id in world.ids.items():
        response = api.client.get(f"{_records(api)}/{entity}/{record_id}", headers=headers)
        assert response.status_code == 200
        check(f"{entity}.Record", response.get_json())
        page = api.client.get(f"{_records(api)}/{entity}", headers=headers)
        check(f"{entity}.Page", page.get_json())
    included = api.client.get(
        f"{_records(api)}/deal?include=customer,primary_contact&fields=name", headers=headers
    )
    check("deal.Page", included.get_json())
    assert included.get_json()["items"][0]["_included"]["customer"]["name"]
    binned = api.client.get(f"{_records(api)}/customer?deleted=true", headers=headers)
    check("customer.Page", binned.get_json())
    count = api.client.get(f"{_records(api)}/customer/count", headers=headers)
    check("Count", count.get_json())


def test_rich_records_validate_against_the_document(world):
    api = world.rich
    doc = _document(api)
    headers = {**api.headers(api_auth(api))}
    contact = _create(api, "contact", {"name": "Li"})
    body = {
        "name": "Rich",
        "code": "AB12",
        "secret": "s3cret",
        "partners": [contact["id"]],
        "extra": {"nested": [1, 2.5, None, "x"]},
        "attachment": {"name": "a.pdf", "size": 12},
        "flags": ["a"],
        "ratio": "0.000001",
        "lifetime_value": 5000,
        "next_follow_up_on": "2024-01-02",
    }
    record = _create(api, "customer", body)
    schema = {"$ref": "#/components/schemas/customer.Record", "components": doc["components"]}
    jsonschema.validate(record, schema, cls=jsonschema.Draft202012Validator)
    assert record["secret"] == "********"
    assert record["is_big"] is True
    create = {"$ref": "#/components/schemas/customer.Create", "components": doc["components"]}
    jsonschema.validate(body, create, cls=jsonschema.Draft202012Validator)
    response = api.client.get(
        f"{_records(api)}/customer?fields=name,partners&include=", headers=headers
    )
    assert response.status_code == 400  # an empty include names no field


def test_document_requires_a_token_and_hides_other_tenants(world):
    api = world.core
    response = api.client.get(f"/t/{api.slug}/api/v1/openapi.json")
    problem(response, 401, "unauthorized")
    other = api.client.get(
        f"/t/{world.rich.slug}/api/v1/openapi.json", headers=api.headers(api_auth(api))
    )
    problem(other, 404, "not_found")
    page = api.client.get(f"/t/{world.rich.slug}/api/v1/docs", headers=api.headers(api_auth(api)))
    problem(page, 404, "not_found")


def test_document_follows_the_published_version(world):
    doc = _document(world.rich)
    assert doc["info"]["version"] == "2"
    assert "code" in doc["components"]["schemas"]["customer.Create"]["properties"]
    assert (
        "code"
        not in _document(world.core)["components"]["schemas"]["customer.Create"]["properties"]
    )


# -- the reference page ----------------------------------------------------------------------


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        found = dict(attrs)
        if found.get("id"):
            self.ids.add(found["id"] or "")
        if tag == "a" and found.get("href"):
            self.links.append(found["href"] or "")
        if tag in ("link", "script", "img"):
            assert not (found.get("src") or found.get("href") or "").startswith("http")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_reference_page_is_plain_html_built_from_the_document(world):
    api = world.core
    response = api.client.get(f"/t/{api.slug}/api/v1/docs", headers=api.headers(api_auth(api)))
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = _Page()
    page.feed(response.get_data(as_text=True))
    assert "script" not in page.tags
    text = " ".join(page.text)
    assert "/records/customer/{id}" in text
    assert "validation_failed" in text and "precondition_required" in text
    assert "customer.Create" in text
    for link in page.links:
        if link.startswith("#"):
            assert link[1:] in page.ids, link
    assert re.search(r"name\s+required", text)


# -- schemathesis ----------------------------------------------------------------------------


CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
]
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


def _run(strategy: Any, auth: str, statuses: Counter[int]) -> None:
    """Send the cases of one strategy and check every answer against the document."""

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: Any) -> None:
        response = case.call_and_validate(headers={"Authorization": auth}, checks=CHECKS)
        statuses[response.status_code] += 1

    run()


def test_api_matches_its_openapi_document(world):
    """Schemathesis over every operation, both generation modes, generated and real ids.

    Runs last in the module: its requests change the core tenant's records.
    """
    api = world.core
    auth = api_auth(api)
    loaded = schemathesis.openapi.from_wsgi(
        f"/t/{api.slug}/api/v1/openapi.json", world.app, headers={"Authorization": auth}
    )
    failures = []
    statuses: Counter[int] = Counter()
    operations = [result.ok() for result in loaded.get_all_operations()]
    assert len(operations) > 60
    for operation in operations:
        entity = operation.path.split("/")[2] if operation.path.startswith("/records/") else None
        for mode in MODES:
            strategies = [operation.as_strategy(generation_mode=mode)]
            if "{id}" in operation.path and entity in world.ids:
                real = {"id": world.ids[entity]}
                strategies.append(operation.as_strategy(generation_mode=mode, path_parameters=real))
            for strategy in strategies:
                try:
                    _run(strategy, auth, statuses)
                except (Exception, BaseExceptionGroup) as exc:  # every failure is reported
                    failures.append(f"{operation.label} [{mode.value}]: {exc}")
    assert not failures, "\n\n".join(failures)
    # The run reached the records, not only the refusals.
    assert statuses[200] >= 10 and statuses[201] and statuses[204] and statuses[404], statuses
