"""The metadata API: read, validate, plan, publish, history, diff, rollback, schemas.

The builder UI, the CLI and partners' tools all use these endpoints; none of
them has a privileged path around it.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for

from metacrm.metadata import schemas
from metacrm.metadata.plan import Plan
from metacrm.metadata.validation import BundleInvalid, validate_bundle
from metacrm.runtime import metastore
from metacrm.runtime.api.context import RequestContext, access, platform, resolve
from metacrm.runtime.api.problem import abort, read_json
from metacrm.runtime.authz import capabilities
from metacrm.runtime.metastore import Actor
from metacrm.runtime.migrator import DataCheckFailed

bp = Blueprint("meta_api", __name__, url_prefix="/t/<tenant>/api/v1/meta")

MAX_BUNDLE_BYTES = 4 * 1024 * 1024
_TYPE_NAMES = {
    int: "a whole number",
    str: "a string",
    bool: "true or false",
    list: "a list",
    dict: "an object",
}


def _context(tenant: str, manage: bool = False) -> RequestContext:
    context = resolve(tenant)
    if manage:
        if context.principal.read_only:
            abort(403, "forbidden", "Forbidden", "this API token is read-only")
        with context.store.connect() as connection:
            model = platform().models.current(context.store, connection)
        if not access(context, model).can("manage_metadata"):
            abort(
                403,
                "forbidden",
                "Forbidden",
                "changing metadata needs a role with the manage_metadata capability",
            )
    return context


def _keep_own_access(context: RequestContext, bundle: dict[str, Any]) -> None:
    """Refuse a bundle under which the publisher could no longer manage metadata.

    Without this, one publish could lock every admin out of the metadata API.
    """
    if "manage_metadata" not in capabilities(bundle, context.principal.membership.roles):
        abort(
            422,
            "would_lock_out",
            "The change would lock you out",
            "under this bundle none of your roles ("
            + ", ".join(context.principal.membership.roles)
            + ") has the manage_metadata capability; keep it in one of them",
            errors=[{"pointer": "/bundle/roles", "message": "keep manage_metadata for a role"}],
        )


def _actor(context: RequestContext) -> Actor:
    return Actor(context.principal.user.id, context.principal.user.email)


def _body() -> dict[str, Any]:
    body = read_json(min(platform().settings.max_request_bytes, MAX_BUNDLE_BYTES))
    if not isinstance(body, dict):
        abort(400, "bad_request", "Bad Request", "the body must be a JSON object")
    return body


def _field(
    body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    if name not in body:
        if default is ...:
            abort(
                422,
                "validation_failed",
                "Invalid request",
                f"'{name}' is required",
                errors=[{"pointer": f"/{name}", "message": "is required"}],
            )
        return default
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        abort(
            422,
            "validation_failed",
            "Invalid request",
            f"'{name}' must be {names}",
            errors=[{"pointer": f"/{name}", "message": f"must be {names}"}],
        )
    return value


def _purge(body: dict[str, Any]) -> list[str]:
    purge = _field(body, "purge", list, [])
    if len(purge) > 500 or not all(isinstance(p, str) and len(p) <= 130 for p in purge):
        abort(
            422,
            "validation_failed",
            "Invalid request",
            "'purge' must be a list of 'entity' or 'entity.field' names",
            errors=[{"pointer": "/purge", "message": "must be a list of names"}],
        )
    return purge


def _invalid(exc: BundleInvalid) -> None:
    abort(
        422,
        "invalid_metadata",
        "The metadata has problems",
        f"{len(exc.problems)} problem(s) found; nothing was changed",
        errors=[p.to_dict() for p in exc.problems],
    )


def _plan_body(plan: Plan) -> dict[str, Any]:
    return plan.to_dict()


def _version_body(version: metastore.Version, with_bundle: bool = True) -> dict[str, Any]:
    body = version.summary()
    body["operations"] = version.operations
    if with_bundle:
        body["bundle"] = version.bundle
    return body


@bp.get("/")
def get_bundle(tenant: str) -> Response:
    """Return the published bundle with its version."""
    context = _context(tenant)
    with context.store.connect() as connection:
        version = metastore.current(connection)
    response = jsonify(_version_body(version))
    response.headers["ETag"] = f'"{version.version}"'
    return response


@bp.post("/validate")
def validate(tenant: str) -> Response:
    """Validate a bundle and return every problem at once (nothing is stored)."""
    _context(tenant, manage=True)
    body = _body()
    bundle = body.get("bundle", body)
    problems = validate_bundle(bundle)
    return jsonify({"valid": not problems, "errors": [p.to_dict() for p in problems]})


@bp.post("/plan")
def plan(tenant: str) -> Response:
    """Plan a bundle against the published version and check it against the data."""
    context = _context(tenant, manage=True)
    body = _body()
    bundle = _field(body, "bundle", dict)
    purge = _purge(body)
    try:
        with context.store.connect() as connection:
            head, the_plan, failures = metastore.preview(connection, bundle, purge)
    except BundleInvalid as exc:
        _invalid(exc)
    result = _plan_body(the_plan)
    result["base_version"] = head.version
    result["checks"] = [f.to_dict() for f in failures]
    result["applicable"] = not failures
    return jsonify(result)


def _publish_errors(call: Any) -> metastore.Version:
    try:
        return call()
    except BundleInvalid as exc:
        _invalid(exc)
    except metastore.VersionConflict as exc:
        abort(
            409,
            "version_conflict",
            "The metadata changed meanwhile",
            str(exc),
            current_version=exc.current,
        )
    except metastore.ConfirmationRequired as exc:
        abort(
            409,
            "confirmation_required",
            "The change drops data",
            "repeat with confirm_destructive set to true to apply it",
            operations=[op.to_dict() for op in exc.plan.operations if op.destructive],
        )
    except DataCheckFailed as exc:
        abort(
            422,
            "data_check_failed",
            "The data does not allow this change",
            "; ".join(f.message for f in exc.failures),
            failures=[f.to_dict() for f in exc.failures],
        )
    except metastore.UnknownVersion as exc:
        abort(404, "not_found", "Not Found", str(exc))
    except metastore.SchemaBusy as exc:
        abort(503, "schema_busy", "The tables are busy", str(exc))


def _published(tenant: str, version: metastore.Version, expected: int) -> Response:
    """Answer a publish or rollback: 201 and a Location for a new version, 200 for none."""
    body = _version_body(version, with_bundle=False)
    body["changed"] = version.version != expected
    response = jsonify(body)
    response.headers["Location"] = url_for(".get_version", tenant=tenant, number=version.version)
    response.status_code = 201 if body["changed"] else 200
    return response


@bp.post("/publish")
def publish(tenant: str) -> Response:
    """Apply a bundle as the next version; nothing changes when anything is refused."""
    context = _context(tenant, manage=True)
    body = _body()
    bundle = _field(body, "bundle", dict)
    expected = _field(body, "expected_version", int)
    comment = _field(body, "comment", str, "")[:1000]
    confirm = _field(body, "confirm_destructive", bool, False)
    purge = _purge(body)
    problems = validate_bundle(bundle)
    if problems:
        _invalid(BundleInvalid(problems))
    _keep_own_access(context, bundle)
    version = _publish_errors(
        lambda: metastore.publish(
            context.store,
            bundle,
            expected_version=expected,
            actor=_actor(context),
            comment=comment,
            confirm_destructive=confirm,
            purge=purge,
            lock_timeout_ms=platform().settings.ddl_lock_timeout_ms,
        )
    )
    return _published(tenant, version, expected)


@bp.post("/rollback")
def rollback(tenant: str) -> Response:
    """Publish an earlier version's bundle as a new version."""
    context = _context(tenant, manage=True)
    body = _body()
    to_version = _field(body, "to_version", int)
    expected = _field(body, "expected_version", int)
    comment = _field(body, "comment", str, "")[:1000]
    confirm = _field(body, "confirm_destructive", bool, False)
    try:
        if to_version <= 0:
            raise metastore.UnknownVersion(f"version {to_version} was never published")
        with context.store.connect() as connection:
            target = metastore.get(connection, to_version)
    except metastore.UnknownVersion as exc:
        abort(404, "not_found", "Not Found", str(exc))
    _keep_own_access(context, target.bundle)
    version = _publish_errors(
        lambda: metastore.rollback(
            context.store,
            to_version,
            expected_version=expected,
            actor=_actor(context),
            comment=comment,
            confirm_destructive=confirm,
            lock_timeout_ms=platform().settings.ddl_lock_timeout_ms,
        )
    )
    return _published(tenant, version, expected)


@bp.get("/versions")
def versions(tenant: str) -> Response:
    """List every published version, newest first."""
    context = _context(tenant)
    with context.store.connect() as connection:
        items = metastore.history(connection)
    return jsonify({"versions": [v.summary() for v in items]})


@bp.get("/versions/<int:number>")
def get_version(tenant: str, number: int) -> Response:
    """Return one published version with its bundle."""
    context = _context(tenant)
    try:
        with context.store.connect() as connection:
            version = metastore.get(connection, number)
    except metastore.UnknownVersion as exc:
        abort(404, "not_found", "Not Found", str(exc))
    return jsonify(_version_body(version))


@bp.get("/diff")
def diff(tenant: str) -> Response:
    """Return the operations leading from one version to another."""
    context = _context(tenant)
    numbers = []
    for name in ("from", "to"):
        raw = request.args.get(name, "")
        if not re.fullmatch(r"[0-9]{1,9}", raw):
            abort(
                400,
                "bad_request",
                "Bad Request",
                f"'{name}' must be a version number",
                errors=[{"pointer": f"/{name}", "message": "must be a version number"}],
            )
        numbers.append(int(raw))
    try:
        with context.store.connect() as connection:
            the_plan = metastore.diff(connection, numbers[0], numbers[1])
    except metastore.UnknownVersion as exc:
        abort(404, "not_found", "Not Found", str(exc))
    except BundleInvalid as exc:
        _invalid(exc)
    return jsonify({"from": numbers[0], "to": numbers[1], **_plan_body(the_plan)})


@bp.get("/schemas/<kind>")
def schema(tenant: str, kind: str) -> Response:
    """Return the JSON Schema of one document kind."""
    _context(tenant)
    if kind not in schemas.KINDS:
        abort(
            404,
            "not_found",
            "Not Found",
            f"no schema {kind[:40]!r}; the kinds are {', '.join(schemas.KINDS)}",
        )
    response = jsonify(schemas.schema(kind))
    response.mimetype = "application/schema+json"
    return response
