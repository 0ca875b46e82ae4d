"""Load the ``core`` sample records into a demo tenant, through the record service.

Dates in the sample are offsets from today (``{"days_ago": 12}``), so the demo
always looks current; lookups refer to other sample records by ``_key``. Going
through the record service means the sample is validated like any payload, gets
audit entries and outbox events, and advances auto-number counters.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
import zoneinfo
from importlib import resources
from typing import Any

from metacrm.runtime import records
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import TenantStore

ORDER = ("customer", "contact", "deal", "interaction", "task")


class SampleError(ValueError):
    """A sample record does not fit the tenant's metadata."""


def _moment(value: Any, today: dt.date, zone: dt.tzinfo, with_time: bool) -> str | None:
    if not isinstance(value, dict) or not ({"days_ago", "in_days"} & set(value)):
        return None
    day = today + dt.timedelta(days=value.get("in_days", 0) - value.get("days_ago", 0))
    if not with_time:
        return day.isoformat()
    hour, minute = (int(p) for p in value.get("at", "09:00").split(":"))
    moment = dt.datetime.combine(day, dt.time(hour, minute, tzinfo=zone))
    return moment.astimezone(dt.UTC).isoformat()


def _payload(
    entity: Any, record: dict[str, Any], keys: dict[str, uuid.UUID], today: dt.date, zone: dt.tzinfo
) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    for name, raw in record.items():
        if name == "_key":
            continue
        f = entity.field(name)
        if f is None:
            raise SampleError(f"{entity.name}.{name} is not a field")
        if f.type in ("date", "datetime"):
            moment = _moment(raw, today, zone, with_time=f.type == "datetime")
            payload[name] = moment if moment is not None else raw
        elif f.type == "lookup":
            if raw not in keys:
                raise SampleError(f"{entity.name}.{name}: unknown sample key {raw!r}")
            payload[name] = str(keys[raw])
        elif f.type == "related_to":
            payload[name] = {"entity": raw["entity"], "id": str(keys[raw["key"]])}
        else:
            payload[name] = raw
    return payload


def load_sample(platform: Platform, store: TenantStore, owner_id: uuid.UUID | None) -> int:
    """Insert the core sample records into a tenant; return how many were inserted."""
    source = resources.files("metacrm.bundles") / "core" / "sample" / "records.json"
    sample = json.loads(source.read_text("utf-8"))
    caller = records.Caller(owner_id, "sample data")
    total = 0
    with store.begin(immediate=True) as connection:
        model = platform.models.current(store, connection)
        zone = zoneinfo.ZoneInfo(model.settings.get("timezone", "UTC"))
        today = dt.datetime.now(zone).date()
        keys: dict[str, uuid.UUID] = {}
        for name in ORDER:
            entity = model.entity(name)
            items = sample.get(name, [])
            if entity is None or not items:
                continue
            payloads = [_payload(entity, r, keys, today, zone) for r in items]
            try:
                created = records.create_many(
                    connection, model, entity, payloads, caller, platform.cipher, bulk=True
                )
            except records.RecordInvalid as exc:
                raise SampleError(f"{name}: {exc}") from None
            for record, stored in zip(items, created, strict=True):
                keys[record["_key"]] = uuid.UUID(stored["id"])
            total += len(created)
    return total
