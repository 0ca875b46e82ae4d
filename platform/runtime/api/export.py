"""Record export: ``GET /t/<tenant>/api/v1/records/<entity>/export``.

An export is the record list without its page size: the same request parsing,
the same permission check, the same query module and the same row condition
as ``GET /records/<entity>``, streamed in keyset batches of
:data:`BATCH` rows. Nothing else is allowed to decide who sees what:

- the caller needs the ``export`` action on the entity (403 ``forbidden``
  otherwise, before anything is read); its scope (``own``, ``team``, ``all``)
  is the WHERE condition of every batch, so a sales manager exports exactly the
  rows their team list shows;
- the model is the caller's view (:meth:`metacrm.runtime.authz.Access.view`):
  a hidden field is not a column of the file, and naming it in ``fields``,
  ``filter`` or ``sort`` is refused exactly like a field that does not exist;
- the first batch is read before the answer starts, so a bad filter, sort or
  field list is a 400 problem and not a broken download.

Each batch is read on a connection of its own, returned to the pool before the
rows are sent: a slow client never holds a transaction (or PostgreSQL's
vacuum horizon) open. Rows changed while an export runs are seen or not, but
the keyset never repeats or skips a row that stayed put.

Every export is audited (``record.export``: entity, format, filter, sort,
fields, rows sent, whether it completed) once the stream ends, also when the
client goes away early. When the number of rows passes the ``mass_export_rows``
setting the tenant's admins are alerted in-app *before* the rows beyond it are
sent, and the audit entry says ``"mass": true``.

CSV cells that a spreadsheet would run as a formula (text starting with ``=``,
``+``, ``-``, ``@``, tab or carriage return) are prefixed with ``'``; plain
numbers such as ``-12.50`` are left alone, since a spreadsheet reads them as
numbers anyway. ``bom=true`` starts the CSV with a UTF-8 byte order mark, which
Microsoft Excel needs to read UTF-8 (Chinese names) instead of the system's
code page; LibreOffice and scripts do not, so it is off by default.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Response, request

from metacrm.metadata.expression import EvalContext
from metacrm.runtime import audittrail, notifications, query, spreadsheet
from metacrm.runtime.api import records as records_api
from metacrm.runtime.api.context import platform
from metacrm.runtime.api.problem import invalid_query
from metacrm.runtime.model import EntityModel, TenantModel
from metacrm.runtime.recordview import SYSTEM_FIELDS
from metacrm.runtime.store import TenantStore

bp = Blueprint("records_export", __name__, url_prefix="/t/<tenant>/api/v1/records")

EXPORT_PARAMETERS = ("format", "filter", "sort", "fields", "bom")
#: Media types of the formats (JSON Lines has no registered type; this is the common one).
FORMATS = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson; charset=utf-8"}
#: Rows per keyset batch: the query module's largest page.
BATCH = query.MAX_LIMIT
BOM = "\ufeff"
AUDIT_ACTION = "record.export"
NOTIFICATION_KIND = "record.mass_export"
#: Turns one batch of records into the file's text.
Encode = Callable[[Sequence[Mapping[str, Any]]], str]


def csv_cell(value: Any) -> str:
    """Return one value as CSV cell text, defused against formula injection."""
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    else:
        text = str(value)
    return spreadsheet.defuse(text, keep_numbers=True)


def _columns(entity: EntityModel, fields: Sequence[str] | None) -> list[str]:
    """Return the export's columns: the system fields, then the asked or all visible fields."""
    names = [f.name for f in entity.entity.active_fields()]
    chosen = names if fields is None else [n for n in fields if n in names]
    return list(dict.fromkeys((*SYSTEM_FIELDS, *chosen)))


def _encoder(kind: str, columns: Sequence[str], bom: bool) -> tuple[str, Encode]:
    """Return the file's first text and a function turning a batch of records into text."""
    if kind == "jsonl":

        def jsonl(items: Sequence[Mapping[str, Any]]) -> str:
            return "".join(
                json.dumps(
                    {c: item.get(c) for c in columns}, ensure_ascii=False, separators=(",", ":")
                )
                + "\n"
                for item in items
            )

        return "", jsonl
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")

    def rows(items: Sequence[Mapping[str, Any]]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerows([csv_cell(item.get(c)) for c in columns] for item in items)
        return buffer.getvalue()

    writer.writerow(columns)
    header = buffer.getvalue()
    return (BOM if bom else "") + header, rows


def _format() -> tuple[str, bool]:
    kind = records_api._param("format") or "csv"
    if kind not in FORMATS:
        invalid_query("format", f"must be one of {', '.join(FORMATS)}")
    bom = records_api._flag("bom")
    if bom and kind != "csv":
        invalid_query("bom", "applies to format=csv only")
    return kind, bom


@bp.get("/<entity>/export")
def export_records(tenant: str, entity: str) -> Response:
    """Stream the records the caller may export as CSV or JSON Lines, audited."""
    records_api._context(tenant)  # authenticate before anything about the request is answered
    records_api._only(*EXPORT_PARAMETERS)
    kind, bom = _format()
    fields = records_api._names("fields")
    wanted = query.ListRequest(
        filter=records_api._param("filter"),
        sort=records_api._param("sort"),
        fields=None if fields is None else tuple(fields),
        limit=BATCH,
    )
    with records_api._reading(tenant, entity, "export") as r:
        secret = records_api._cursor_secret(r.context)
        first = query.list_records(r.connection, r.model, r.entity, wanted, r.ctx, secret, r.scope)
        context, model, shown, ctx, scope = r.context, r.model, r.entity, r.ctx, r.scope
    principal = context.principal
    job = _Export(
        store=context.store,
        model=model,
        entity=shown,
        wanted=wanted,
        ctx=ctx,
        secret=secret,
        scope=scope,
        threshold=platform().settings.mass_export_rows,
        actor=(principal.user.id, principal.user.email),
        ip=request.remote_addr,
        slug=context.tenant.slug,
        kind=kind,
    )
    header, encode = _encoder(kind, _columns(shown, wanted.fields), bom)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    filename = f"{shown.name}-{context.tenant.slug}-{stamp}.{kind}"
    return Response(
        job.stream(first, header, encode),
        mimetype=FORMATS[kind],
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )


@dataclass
class _Export:
    """One running export: reads the next batches, alerts, and audits when it ends."""

    store: TenantStore
    model: TenantModel
    entity: EntityModel
    wanted: query.ListRequest
    ctx: EvalContext
    secret: bytes
    scope: sa.ColumnElement[bool] | None
    threshold: int
    actor: tuple[uuid.UUID, str]
    ip: str | None
    slug: str
    kind: str
    sent: int = 0
    alerted: bool = False

    def _next(self, cursor: str) -> query.Page:
        with self.store.connect() as connection:
            request_ = query.ListRequest(
                filter=self.wanted.filter,
                sort=self.wanted.sort,
                fields=self.wanted.fields,
                limit=BATCH,
                cursor=cursor,
            )
            return query.list_records(
                connection, self.model, self.entity, request_, self.ctx, self.secret, self.scope
            )

    def stream(self, first: query.Page, header: str, encode: Encode) -> Iterator[str]:
        """Yield the file: header, then one chunk per batch; audit in ``finally``."""
        complete = False
        try:
            if header:
                yield header
            page = first
            while True:
                if page.items:
                    if not self.alerted and self.sent + len(page.items) > self.threshold:
                        self._alert()
                    # Counted before the yield: rows handed to the server count as sent,
                    # even if the client leaves before asking for the next batch.
                    self.sent += len(page.items)
                    yield encode(page.items)
                if page.next_cursor is None:
                    complete = True
                    break
                page = self._next(page.next_cursor)
        finally:
            self._audit(complete)

    def _alert(self) -> None:
        """Tell the tenant's admins, in its own transaction, before the mass leaves."""
        email, name, limit = self.actor[1], self.entity.name, self.threshold
        with self.store.begin() as connection:
            notifications.notify_admins(
                connection,
                kind=NOTIFICATION_KIND,
                message={
                    "en": f"{email} is exporting more than {limit:,} '{name}' records.",
                    "zh-CN": f"{email} 正在导出超过 {limit:,} 条“{name}”记录。",
                },
                link=f"/t/{self.slug}/api/v1/audit?action={AUDIT_ACTION}&entity={name}",
            )
        self.alerted = True

    def _audit(self, complete: bool) -> None:
        detail = {
            "format": self.kind,
            "filter": self.wanted.filter,
            "sort": self.wanted.sort,
            "fields": None if self.wanted.fields is None else list(self.wanted.fields),
            "rows": self.sent,
            "complete": complete,
            "mass": self.sent > self.threshold,
            "mass_export_rows": self.threshold,
        }
        with self.store.begin() as connection:
            audittrail.append(
                connection,
                action=AUDIT_ACTION,
                actor_id=self.actor[0],
                actor_name=self.actor[1],
                entity=self.entity.name,
                detail=detail,
                ip=self.ip,
            )
