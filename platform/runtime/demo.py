"""Load the ``core`` sample records into a demo tenant.

Dates in the sample are offsets from today (``{"days_ago": 12}``), so the demo
always looks current; lookups refer to other sample records by ``_key``. The
records are inserted with the same field coercion the metadata defines, so a
sample value that does not fit its field fails loudly instead of being stored.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
import zoneinfo
from importlib import resources
from typing import Any

from uuid6 import uuid7

from metacrm.metadata import fieldtypes
from metacrm.metadata.model import Bundle
from metacrm.metadata.tables import build_tables
from metacrm.runtime import metastore
from metacrm.runtime.store import TenantStore

ORDER = ("customer", "contact", "deal", "interaction", "task")


class SampleError(ValueError):
    """A sample record does not fit the tenant's metadata."""


def _moment(value: Any, today: dt.date, zone: dt.tzinfo) -> tuple[dt.date, dt.time] | None:
    if not isinstance(value, dict) or not ({"days_ago", "in_days"} & set(value)):
        return None
    offset = value.get("in_days", 0) - value.get("days_ago", 0)
    hour, minute = (int(p) for p in value.get("at", "09:00").split(":"))
    return today + dt.timedelta(days=offset), dt.time(hour, minute, tzinfo=zone)


def _value(f: Any, raw: Any, keys: dict[str, uuid.UUID], today: dt.date, zone: dt.tzinfo) -> Any:
    moment = _moment(raw, today, zone)
    if f.type == "date" and moment:
        return moment[0]
    if f.type == "datetime" and moment:
        return dt.datetime.combine(moment[0], moment[1]).astimezone(dt.UTC)
    if f.type == "lookup":
        if raw not in keys:
            raise SampleError(f"{f.path}: unknown sample key {raw!r}")
        return keys[raw]
    return fieldtypes.get(f.type).coerce(f, raw)


def load_sample(store: TenantStore, owner_id: uuid.UUID | None) -> int:
    """Insert the core sample records into a tenant; return how many were inserted."""
    source = resources.files("metacrm.bundles") / "core" / "sample" / "records.json"
    sample = json.loads(source.read_text("utf-8"))
    with store.begin(immediate=True) as connection:
        bundle = Bundle.from_doc(metastore.current(connection).bundle)
        tables = build_tables(bundle)
        zone = zoneinfo.ZoneInfo(bundle.doc.get("settings", {}).get("timezone", "UTC"))
        now = dt.datetime.now(dt.UTC)
        today = now.astimezone(zone).date()
        keys: dict[str, uuid.UUID] = {}
        counters: dict[str, int] = {}
        total = 0
        for name in ORDER:
            entity = bundle.entities[name]
            rows = []
            for record in sample.get(name, []):
                row: dict[str, Any] = {
                    "id": uuid7(),
                    "owner_id": owner_id,
                    "created_by": owner_id,
                    "updated_by": owner_id,
                    "created_at": now,
                    "updated_at": now,
                    "version": 1,
                }
                keys[record["_key"]] = row["id"]
                for field_name, raw in record.items():
                    if field_name == "_key":
                        continue
                    f = entity.fields.get(field_name)
                    if f is None:
                        raise SampleError(f"{name}.{field_name} is not a field")
                    if f.type == "related_to":
                        row[f"{field_name}_entity"] = raw["entity"]
                        row[f"{field_name}_id"] = raw["key"]
                        continue
                    row[field_name] = _value(f, raw, keys, today, zone)
                for f in entity.fields.values():
                    if f.type == "auto_number":
                        counters[f.path] = counters.get(f.path, f.get("start", 1) - 1) + 1
                        number = str(counters[f.path]).zfill(f.get("padding", 5))
                        row[f.name] = f"{f.get('prefix', '')}{number}"
                    elif f.has_default and f.name not in row and f.type not in ("formula",):
                        row[f.name] = fieldtypes.get(f.type).coerce(f, f.default)
                rows.append(row)
            for row in rows:
                for column, value in list(row.items()):
                    if column.endswith("_id") and isinstance(value, str) and value in keys:
                        row[column] = keys[value]
            if rows:
                columns = set().union(*rows)
                connection.execute(
                    tables.tables[name].insert(), [{c: r.get(c) for c in columns} for r in rows]
                )
                total += len(rows)
    return total
