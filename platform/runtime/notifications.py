"""In-app notifications, stored in the tenant's namespace with the change that caused them.

A notification goes either to named members (:func:`notify`) or to every
member whose roles hold a capability (:func:`notify_admins` addresses
``manage_users``). Addressing a capability instead of listing its holders
keeps the writer inside the tenant's own transaction (the member list lives in
the control database, which that transaction cannot see), and an admin
appointed later still sees the alerts that are waiting. Who holds the
capability is decided when a member reads, from the published roles.

Whether a member has read a notification is kept per member in
``_notification_read``, so one alert to all admins is read by each on their own.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from uuid6 import uuid7

from metacrm.runtime.store import notification, notification_read

#: Every notification is written in each supported UI language.
LANGUAGES = ("en", "zh-CN")
#: The capability that makes a member an administrator for alerts.
ADMINS = "manage_users"
KIND = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
MAX_KIND = 63
MAX_MESSAGE = 2000
MAX_LINK = 2000
MAX_RECIPIENTS = 10_000


class NotificationError(ValueError):
    """A notification was refused because a field is malformed."""


@dataclass(frozen=True)
class Notification:
    """One notification as a member sees it."""

    id: uuid.UUID
    created_at: dt.datetime
    kind: str
    message: dict[str, str]
    link: str | None
    read_at: dt.datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
            "kind": self.kind,
            "message": self.message,
            "link": self.link,
            "read": self.read_at is not None,
            "read_at": None
            if self.read_at is None
            else self.read_at.isoformat().replace("+00:00", "Z"),
        }


def _check(kind: str, message: Mapping[str, str], link: str | None) -> dict[str, str]:
    if not isinstance(kind, str) or len(kind) > MAX_KIND or not KIND.match(kind):
        raise NotificationError(f"'{kind}' is not a notification kind (dotted lower-case words)")
    if not isinstance(message, Mapping) or set(message) != set(LANGUAGES):
        raise NotificationError(
            "the message needs exactly these languages: " + ", ".join(LANGUAGES)
        )
    for language, text in message.items():
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_MESSAGE:
            raise NotificationError(
                f"the '{language}' message must be text of 1 to {MAX_MESSAGE} characters"
            )
        if "\x00" in text:
            raise NotificationError(f"the '{language}' message cannot contain NUL characters")
    if link is not None:
        # Only links inside the application: never an open redirect to another site.
        if (
            not isinstance(link, str)
            or len(link) > MAX_LINK
            or not link.startswith("/")
            or link.startswith("//")
            or any(c in link for c in "\\\r\n\t\x00")
        ):
            raise NotificationError("the link must be a path inside metacrm, starting with '/'")
    return {language: message[language] for language in LANGUAGES}


def notify(
    connection: Connection,
    user_ids: Iterable[uuid.UUID],
    *,
    kind: str,
    message: Mapping[str, str],
    link: str | None = None,
    at: dt.datetime | None = None,
) -> list[uuid.UUID]:
    """Store a notification for each named member, in the caller's transaction.

    ``message`` holds the text in English (``en``) and Simplified Chinese
    (``zh-CN``); ``link`` is an application path. Returns the new ids.
    """
    text = _check(kind, message, link)
    recipients = list(dict.fromkeys(user_ids))
    if len(recipients) > MAX_RECIPIENTS:
        raise NotificationError(f"at most {MAX_RECIPIENTS} recipients at once")
    if not all(isinstance(u, uuid.UUID) for u in recipients):
        raise NotificationError("recipients are user ids")
    when = at or dt.datetime.now(dt.UTC)
    rows = [
        {
            "id": uuid7(),
            "created_at": when,
            "user_id": user_id,
            "capability": None,
            "kind": kind,
            "message": text,
            "link": link,
        }
        for user_id in recipients
    ]
    if rows:
        connection.execute(notification.insert(), rows)
    return [r["id"] for r in rows]


def notify_admins(
    connection: Connection,
    *,
    kind: str,
    message: Mapping[str, str],
    link: str | None = None,
    at: dt.datetime | None = None,
) -> uuid.UUID:
    """Store one notification for every member whose roles hold ``manage_users``.

    The recipients are resolved when they read (see the module docstring), so
    the caller passes none. Returns the notification's id.
    """
    text = _check(kind, message, link)
    new_id = uuid7()
    connection.execute(
        notification.insert().values(
            id=new_id,
            created_at=at or dt.datetime.now(dt.UTC),
            user_id=None,
            capability=ADMINS,
            kind=kind,
            message=text,
            link=link,
        )
    )
    return new_id


def _audience(user_id: uuid.UUID, capabilities: Iterable[str]) -> sa.ColumnElement[bool]:
    held = sorted(set(capabilities))
    clause = notification.c.user_id == user_id
    if held:
        clause = sa.or_(clause, notification.c.capability.in_(held))
    return clause


def inbox(
    connection: Connection,
    user_id: uuid.UUID,
    capabilities: Iterable[str],
    *,
    unread_only: bool = False,
    before: uuid.UUID | None = None,
    limit: int = 50,
) -> list[Notification]:
    """Return a member's notifications, newest first, a page at a time.

    ``before`` is the id of the last notification of the previous page (ids
    are time-ordered UUIDv7, so the keyset is the id alone).
    """
    read = notification_read.alias("r")
    query = (
        sa.select(
            notification.c.id,
            notification.c.created_at,
            notification.c.kind,
            notification.c.message,
            notification.c.link,
            read.c.read_at,
        )
        .select_from(
            notification.outerjoin(
                read,
                sa.and_(read.c.notification_id == notification.c.id, read.c.user_id == user_id),
            )
        )
        .where(_audience(user_id, capabilities))
        .order_by(notification.c.id.desc())
        .limit(limit)
    )
    if unread_only:
        query = query.where(read.c.read_at.is_(None))
    if before is not None:
        query = query.where(notification.c.id < before)
    return [
        Notification(r.id, r.created_at, r.kind, dict(r.message), r.link, r.read_at)
        for r in connection.execute(query)
    ]


def unread_count(connection: Connection, user_id: uuid.UUID, capabilities: Iterable[str]) -> int:
    """Return how many of a member's notifications are unread (the badge in the header)."""
    read = sa.exists().where(
        notification_read.c.notification_id == notification.c.id,
        notification_read.c.user_id == user_id,
    )
    return connection.execute(
        sa.select(sa.func.count())
        .select_from(notification)
        .where(_audience(user_id, capabilities), ~read)
    ).scalar_one()


def mark_read(
    connection: Connection,
    user_id: uuid.UUID,
    capabilities: Iterable[str],
    ids: Sequence[uuid.UUID] | None = None,
    *,
    at: dt.datetime | None = None,
) -> int:
    """Mark notifications of this member read (all of them when ``ids`` is None).

    Ids that are not addressed to the member are ignored, so nobody can learn
    or touch another member's notifications. Returns how many became read.
    """
    read = sa.exists().where(
        notification_read.c.notification_id == notification.c.id,
        notification_read.c.user_id == user_id,
    )
    query = sa.select(notification.c.id).where(_audience(user_id, capabilities), ~read)
    if ids is not None:
        if not ids:
            return 0
        query = query.where(notification.c.id.in_(list(ids)))
    targets = list(connection.execute(query).scalars())
    if not targets:
        return 0
    when = at or dt.datetime.now(dt.UTC)
    insert = (postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert)(
        notification_read
    )
    connection.execute(
        insert.on_conflict_do_nothing(),
        [{"notification_id": t, "user_id": user_id, "read_at": when} for t in targets],
    )
    return len(targets)


def addressed_to(
    connection: Connection,
    notification_id: uuid.UUID,
    user_id: uuid.UUID,
    capabilities: Iterable[str],
) -> bool:
    """Tell whether a notification is addressed to this member (directly or by capability)."""
    found = connection.execute(
        sa.select(notification.c.id).where(
            notification.c.id == notification_id, _audience(user_id, capabilities)
        )
    ).first()
    return found is not None
