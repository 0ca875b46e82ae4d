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
from typing import Any

from metacrm.metadata.loader import template_folder
from metacrm.runtime import records
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import TenantStore


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


def _order(model: Any, names: list[str]) -> list[str]:
    """Order entities so that every lookup points at an entity loaded earlier."""
    done: list[str] = []
    pending = list(names)
    while pending:
        for name in pending:
            entity = model.entity(name)
            targets = (
                {f.get("target") for f in entity.entity.active_fields() if f.type == "lookup"}
                if entity
                else set()
            )
            targets |= {
                t
                for f in (entity.entity.active_fields() if entity else [])
                if f.type == "related_to"
                for t in f.get("targets", [])
            }
            if not (targets - {name}) & (set(pending) - {name}):
                done.append(name)
                pending.remove(name)
                break
        else:
            raise SampleError(
                "sample entities point at each other in a cycle: " + ", ".join(pending)
            )
    return done


def load_sample(
    platform: Platform, store: TenantStore, owner_id: uuid.UUID | None, template: str = "core"
) -> int:
    """Insert a template's sample records into a tenant; return how many were inserted."""
    try:
        source = template_folder(template) / "sample" / "records.json"
        sample = json.loads(source.read_text("utf-8"))
    except (KeyError, FileNotFoundError):
        raise SampleError(f"the template {template!r} has no sample data") from None
    caller = records.Caller(owner_id, "sample data")
    total = 0
    with store.begin(immediate=True) as connection:
        model = platform.models.current(store, connection)
        zone = zoneinfo.ZoneInfo(model.settings.get("timezone", "UTC"))
        today = dt.datetime.now(zone).date()
        keys: dict[str, uuid.UUID] = {}
        unknown = [name for name in sample if model.entity(name) is None]
        if unknown:
            raise SampleError(f"no entity {unknown[0]!r} in this tenant")
        for name in _order(model, list(sample)):
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
