"""The entities the expression tests run against: scopes, tables and an evaluation context."""

from __future__ import annotations

import datetime as dt
import uuid

import sqlalchemy as sa

from metacrm.metadata.coltypes import ExactDecimal, JSONValue, UTCDateTime
from metacrm.metadata.expression import EvalContext, FieldInfo, Scope, ValueType

T = ValueType

CUSTOMER = Scope(
    "customer",
    {
        "id": FieldInfo(T.UUID),
        "level": FieldInfo(T.TEXT),
        "score": FieldInfo(T.INTEGER),
        "secret": FieldInfo(T.TEXT, filterable=False),
    },
)

DEAL = Scope(
    "deal",
    {
        "id": FieldInfo(T.UUID),
        "name": FieldInfo(T.TEXT),
        "note": FieldInfo(T.TEXT),
        "amount": FieldInfo(T.DECIMAL),
        "qty": FieldInfo(T.INTEGER),
        "active": FieldInfo(T.BOOLEAN),
        "close_date": FieldInfo(T.DATE),
        "created_at": FieldInfo(T.DATETIME),
        "owner_id": FieldInfo(T.UUID),
        "team_id": FieldInfo(T.UUID),
        "customer": FieldInfo(T.UUID, target=CUSTOMER),
        "tags": FieldInfo(T.LIST),
        "meta": FieldInfo(T.JSON),
        "stage": FieldInfo(T.TEXT),
        "hidden": FieldInfo(T.TEXT, filterable=False),
    },
)

USERS = tuple(uuid.UUID(int=index) for index in range(1, 4))
TEAMS = tuple(uuid.UUID(int=index) for index in range(11, 14))
CUSTOMER_IDS = tuple(uuid.UUID(int=index) for index in range(21, 23))

CTX = EvalContext(
    now=dt.datetime(2024, 5, 2, 12, 30, 15, 250000, tzinfo=dt.UTC),
    today=dt.date(2024, 5, 2),
    user_id=USERS[0],
    team_ids=TEAMS[:2],
)


def build_tables(metadata: sa.MetaData) -> dict[str, sa.Table]:
    """Declare the deal and customer tables with the column types the runtime uses."""
    customer = sa.Table(
        "customer",
        metadata,
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("level", sa.String(50)),
        sa.Column("score", sa.BigInteger),
        sa.Column("secret", sa.String(50)),
    )
    deal = sa.Table(
        "deal",
        metadata,
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("name", sa.String(200)),
        sa.Column("note", sa.Text),
        sa.Column("amount", ExactDecimal(18, 4)),
        sa.Column("qty", sa.BigInteger),
        sa.Column("active", sa.Boolean),
        sa.Column("close_date", sa.Date),
        sa.Column("created_at", UTCDateTime()),
        sa.Column("owner_id", sa.Uuid),
        sa.Column("team_id", sa.Uuid),
        sa.Column("customer", sa.Uuid),
        sa.Column("tags", JSONValue()),
        sa.Column("meta", JSONValue()),
        sa.Column("stage", sa.String(50)),
        sa.Column("hidden", sa.String(50)),
    )
    return {"customer": customer, "deal": deal}


DEAL_COLUMNS = tuple(name for name in DEAL.fields)
