"""Record import: ``POST /t/<tenant>/api/v1/records/<entity>/import``.

The body is the file itself (CSV or JSON Lines, UTF-8 or GB18030), at most
``max_import_bytes``. The caller needs the ``import`` *and* the ``create``
action on the entity (403 before anything is read otherwise); rows are created
through the record service exactly as ``POST /records/<entity>`` creates them
(:mod:`metacrm.runtime.importer`), in one transaction: all of them or none.

Query parameters: ``format`` (``csv`` or ``jsonl``; by default taken from the
Content-Type), ``encoding`` (``utf-8``, the default, or ``gb18030``),
``delimiter`` (``,``, ``;`` or ``tab``; CSV only), ``skip`` (header texts of
columns to leave out, comma-separated; CSV only) and ``dry_run`` (check every
row, store nothing). ``Idempotency-Key`` works as on every create.

Answers: ``201`` with the number of rows read and created and how the columns
were used (``200`` for a dry run); ``422 unreadable_file`` when the file or its
header cannot be read (every problem listed); ``422 validation_failed`` when
rows are refused, each error naming its ``row`` (the file's line) and pointing
at ``/rows/<row>/<field>``. A completed import is audited once as
``record.import`` besides the grouped ``record.create`` entries of its records (one
per 500).
"""

from __future__ import annotations

import io
from collections.abc import Collection
from typing import Any

import flask
from flask import Blueprint, Response, current_app, request

from metacrm.runtime import audittrail, importer
from metacrm.runtime.api import records as records_api
from metacrm.runtime.api.context import platform
from metacrm.runtime.api.problem import abort, invalid_query

bp = Blueprint("records_import", __name__, url_prefix="/t/<tenant>/api/v1/records")

IMPORT_PARAMETERS = ("format", "encoding", "delimiter", "skip", "dry_run")
#: Content-Types that name a format when ``format`` is not given.
MEDIA_TYPES = {
    "text/csv": "csv",
    "application/csv": "csv",
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/jsonlines": "jsonl",
}
AUDIT_ACTION = "record.import"
ENDPOINT = "records_import.import_records"


def _choice(name: str, allowed: Collection[str], default: str) -> str:
    raw = records_api._param(name)
    if raw is None:
        return default
    if raw not in allowed:
        invalid_query(name, f"must be one of: {', '.join(allowed)}")
    return raw


def _format() -> str:
    chosen = _choice("format", importer.FORMATS, "")
    if chosen:
        return chosen
    found = MEDIA_TYPES.get(request.mimetype)
    if found is None:
        abort(
            415,
            "unsupported_media_type",
            "Send a CSV or JSON Lines file",
            f"the body is {request.mimetype or 'untyped'}; send text/csv or "
            "application/x-ndjson, or say format=csv|jsonl",
        )
    return found


class Request(flask.Request):
    """Flask's request, with the import endpoint's own body limit.

    The limit must hold before any view runs: the CSRF check of a request signed
    in with the login cookie reads the form first, and Werkzeug fixes the body's
    limit when the stream is first opened.
    """

    @property
    def max_content_length(self) -> int | None:
        if self.endpoint == ENDPOINT:
            return int(current_app.config["METACRM_SETTINGS"].max_import_bytes)
        return super().max_content_length


def _file() -> bytes:
    """Return the body; past ``max_import_bytes`` Werkzeug has answered 413 already (Request)."""
    data = request.get_data(cache=False)
    if not data.strip():
        abort(400, "bad_request", "Bad Request", "the body is empty: send the file to import")
    return data


@bp.post("/<entity>/import")
def import_records(tenant: str, entity: str) -> Response:
    """Create records from a CSV or JSON Lines file, all or none."""
    # Authenticate before anything about the request is answered.
    records_api._context(tenant, write=True, parameters=IMPORT_PARAMETERS)
    kind = _format()
    encoding = _choice("encoding", importer.ENCODINGS, "utf-8")
    delimiter = _choice("delimiter", importer.DELIMITERS, ",")
    dry_run = records_api._flag("dry_run")
    skip = records_api._names("skip") or []
    if kind == "jsonl" and (delimiter != "," or skip):
        invalid_query("delimiter" if delimiter != "," else "skip", "is for CSV files only")
    if len(skip) > importer.MAX_COLUMNS:
        invalid_query("skip", f"names more than {importer.MAX_COLUMNS} columns")
    data = _file()

    def action(w: records_api.Write) -> records_api.Answer:
        records_api._allowed(w.context, w.model, w.entity.name, "create")
        try:
            text = importer.decode(data, encoding)
            shown = w.access.view(w.model).entities[w.entity.name]
            used: dict[str, str] = {}
            ignored: list[str] = []
            if kind == "csv":
                columns, rows = importer.csv_rows(
                    shown, io.StringIO(text, newline=""), importer.DELIMITERS[delimiter], skip
                )
                used, ignored = columns.used, columns.ignored
            else:
                rows = importer.jsonl_rows(importer.lines(text))
            read, created = importer.import_rows(
                w.connection,
                w.model,
                w.entity,
                rows,
                w.caller,
                platform().cipher,
                dry_run=dry_run,
            )
        except importer.UnreadableFile as exc:
            abort(
                422,
                "unreadable_file",
                "The file cannot be read",
                f"{len(exc.errors)} problem(s) with the file; nothing was imported",
                errors=exc.errors,
            )
        except importer.ImportRefused as exc:
            more = "" if exc.complete else f"; stopped looking after {len(exc.errors)}"
            abort(
                422,
                "validation_failed",
                "Invalid request",
                f"{len(exc.errors)} problem(s) in {exc.rows_read} row(s){more}; "
                "nothing was imported",
                errors=exc.errors,
            )
        body: dict[str, Any] = {
            "entity": w.entity.name,
            "format": kind,
            "dry_run": dry_run,
            "rows": read,
            "created": created,
            "columns": used,
            "ignored_columns": ignored,
        }
        if dry_run:
            return 200, body, {}
        audittrail.append(
            w.connection,
            action=AUDIT_ACTION,
            actor_id=w.caller.user_id,
            actor_name=w.caller.name,
            entity=w.entity.name,
            detail={"format": kind, "rows": read, "created": created, "bytes": len(data)},
            ip=request.remote_addr,
        )
        return 201, body, {}

    return records_api._write(
        tenant,
        entity,
        action,
        replayable=True,
        permission="import",
        parameters=IMPORT_PARAMETERS,
    )
