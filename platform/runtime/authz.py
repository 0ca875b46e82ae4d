"""Who may do what: Casbin decides, SQL enforces.

Roles and permissions are metadata (the bundle's ``roles`` documents). For each
tenant and published version a :class:`TenantPolicy` turns them into a Casbin
``FastEnforcer`` (model: ``metacrm.defaults/authz_model.conf``, RBAC with the
tenant as domain) built in memory; nothing is ever saved, because the published
metadata is the only source of truth and there is no policy table.

Per request an :class:`Access` (from the request's
:class:`~metacrm.runtime.principal.Principal`) answers three kinds of question:

- may the caller do ``action`` on entity ``E`` at all, and over which records
  (``scope``: ``own``, ``team`` or ``all``)? The scope becomes a SQL condition
  (:meth:`Access.where`) that the record service and the query module put in the
  WHERE clause of the statement itself, so a record outside it is simply not
  found (404) and a million-row list costs a sales rep what it costs an admin;
- which fields does field-level security hide from the caller or keep read-only
  (:meth:`Access.hidden_fields`, :meth:`Access.read_only_fields`,
  :meth:`Access.view`: the tenant model with hidden fields taken out, so every
  reader of the model treats them exactly as unknown fields);
- which tenant-wide capabilities (``manage_metadata``, ``manage_users``,
  ``view_audit``, ``export``, ``import``) the caller holds.

How several roles combine (the decision record 0007 says why): rights are the
union of the roles' grants, inherited roles included; an explicit deny of an
action on an entity wins over every grant of it; a field is hidden only when
every permission that grants reading the entity hides it (or a deny lists it);
a field is read-only when every permission granting a write keeps it read-only
or hidden.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Any

import casbin
import sqlalchemy as sa
from casbin.model import FastModel
from sqlalchemy.orm import Session

from metacrm.metadata.expression.scope import Scope
from metacrm.metadata.expression.walk import references
from metacrm.metadata.identifiers import is_identifier
from metacrm.metadata.model import EntityDef
from metacrm.runtime import control
from metacrm.runtime.model import EntityModel, TenantModel
from metacrm.runtime.principal import Principal

#: Actions a permission grants on an entity's records.
ACTIONS = ("read", "create", "update", "delete", "export", "import")
#: Scopes from the broadest to the narrowest.
SCOPES = ("all", "team", "own")
#: Tenant-wide rights, granted by roles' ``capabilities``.
CAPABILITIES = ("manage_metadata", "manage_users", "view_audit", "export", "import")
#: Actions and capabilities a read-only token keeps.
READ_ACTIONS = frozenset({"read", "export"})
READ_CAPABILITIES = frozenset({"view_audit", "export"})
#: The Casbin object that capabilities are granted on (no entity can be named so).
TENANT_OBJECT = "_tenant"
#: Scope written on deny lines: a deny takes the action away over every scope.
ANY_SCOPE = "any"
#: Tenants whose policies one process keeps (least recently used dropped first).
POLICY_CACHE_SIZE = 2048
#: Decisions one policy remembers; role sets per tenant are few, so this is never reached
#: in practice and only bounds memory against hostile churn.
DECISION_CACHE_SIZE = 65536

#: Request and policy positions the FastEnforcer keys its policy on: tenant, entity.
CACHE_KEY_ORDER = (1, 2)

_SCOPE_RANK = {"own": 1, "team": 2, "all": 3}


class Forbidden(Exception):
    """The caller may not do this at all (answered 403 ``forbidden``)."""


class OwnerRefused(Exception):
    """An ``owner_id`` the caller may not assign (answered 422 on ``/owner_id``)."""


def model_text() -> str:
    """Return the Casbin model shipped in ``metacrm.defaults``."""
    return resources.files("metacrm.defaults").joinpath("authz_model.conf").read_text("utf-8")


def scope_covers(granted: str, asked: str) -> bool:
    """Tell whether a granted scope includes the asked one (Casbin matcher ``scopeCovers``).

    ``all`` covers ``team`` and ``own``; ``team`` covers ``own``; a deny line's
    ``any`` covers everything, so a deny takes the action away whatever scope is asked.
    """
    if granted == ANY_SCOPE:
        return True
    return _SCOPE_RANK.get(granted, 0) >= _SCOPE_RANK.get(asked, 99)


@dataclass(frozen=True)
class FieldRules:
    """Field-level security of one entity for one set of roles."""

    hidden: frozenset[str] = frozenset()
    read_only: frozenset[str] = frozenset()


def _role_documents(bundle_doc: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Return the bundle's roles by name, keeping only names of the identifier grammar.

    The metadata validator refuses other names already; this is the second
    line: a comma or bracket in a name would corrupt a policy line, so such a
    role grants nothing at all.
    """
    listed = bundle_doc.get("roles", [])
    found: dict[str, Mapping[str, Any]] = {}
    for doc in listed if isinstance(listed, list) else []:
        if isinstance(doc, Mapping) and is_identifier(doc.get("name")):
            found.setdefault(doc["name"], doc)
    return found


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


class TenantPolicy:
    """The permissions of one tenant at one published version, compiled for decisions.

    Casbin evaluates the matcher for every policy line of the filtered
    (tenant, entity) bucket: tens of microseconds per call, three calls to find
    the broadest scope. Answers are therefore memoised per (role set, entity,
    action): the policy object belongs to one version, so a memo can never be
    stale, and the cost of a decision becomes one dictionary lookup whatever
    the number of tenants (each tenant has its own policy object).
    """

    def __init__(self, tenant_id: uuid.UUID, version: int, bundle_doc: Mapping[str, Any]) -> None:
        self.tenant_id = tenant_id
        self.version = version
        self.domain = str(tenant_id)
        self.roles = _role_documents(bundle_doc)
        self.entity_names = tuple(
            e["name"]
            for e in bundle_doc.get("entities", [])
            if isinstance(e, Mapping) and not e.get("archived") and is_identifier(e.get("name"))
        )
        self._lock = threading.Lock()
        self._subjects: dict[frozenset[str], str] = {}
        self._decisions: dict[tuple[frozenset[str], str, str], str | None] = {}
        self._fields: dict[tuple[frozenset[str], str], FieldRules] = {}
        self._closures: dict[frozenset[str], tuple[Mapping[str, Any], ...]] = {}
        self._views: dict[tuple[int, frozenset[str], bool], tuple[TenantModel, TenantModel]] = {}
        self.enforcer = self._build()

    # -- the enforcer ---------------------------------------------------------------------

    def policy_lines(self) -> tuple[list[list[str]], list[list[str]]]:
        """Return (p lines, g lines) derived from the roles documents.

        ``*`` entities are expanded to every active entity, so the FastEnforcer
        can key its policy on (tenant, entity) and each decision looks at the
        lines of one entity only.
        """
        p: list[list[str]] = []
        g: list[list[str]] = []
        dom = self.domain
        for name, doc in self.roles.items():
            for parent in _strings(doc.get("inherits")):
                if parent in self.roles:
                    g.append([name, parent, dom])
            permissions = doc.get("permissions", [])
            for grant in permissions if isinstance(permissions, list) else []:
                if not isinstance(grant, Mapping):
                    continue
                target = grant.get("entity")
                if target == "*":
                    entities: Iterable[str] = self.entity_names
                elif target in self.entity_names:
                    entities = (target,)
                else:
                    continue
                deny = grant.get("effect", "allow") == "deny"
                scope = ANY_SCOPE if deny else grant.get("scope", "own")
                if scope not in _SCOPE_RANK and scope != ANY_SCOPE:
                    continue
                actions = [a for a in _strings(grant.get("actions")) if a in ACTIONS]
                for entity in entities:
                    for action in actions:
                        p.append([name, dom, entity, action, scope, "deny" if deny else "allow"])
            for capability in _strings(doc.get("capabilities")):
                if capability in CAPABILITIES:
                    p.append([name, dom, TENANT_OBJECT, capability, "all", "allow"])
        return p, g

    def _build(self) -> casbin.FastEnforcer:
        # Policies are bucketed by (tenant, entity): positions 1 and 2 of both the
        # request and the policy line, so a decision reads one entity's lines only.
        model = FastModel(CACHE_KEY_ORDER)
        model.load_model_from_text(model_text())
        enforcer = casbin.FastEnforcer(model, cache_key_order=CACHE_KEY_ORDER)
        enforcer.add_function("scopeCovers", scope_covers)
        p, g = self.policy_lines()
        if p:
            enforcer.add_policies(p)
        if g:
            enforcer.add_grouping_policies(g)
        return enforcer

    def _subject(self, roles: frozenset[str]) -> str:
        """Return the Casbin subject standing for a set of roles (called under the lock).

        Members are not policy lines (they live in the control database and change
        without a publish); a member's set of roles becomes one subject linked to
        each role, added the first time the set is seen. ``+`` and ``:`` cannot
        appear in role names, so a subject never collides with a role.
        """
        subject = self._subjects.get(roles)
        if subject is None:
            subject = "roles:" + "+".join(sorted(roles))
            rules = [[subject, role, self.domain] for role in sorted(roles)]
            if rules:
                self.enforcer.add_grouping_policies(rules)
            self._subjects[roles] = subject
        return subject

    # -- decisions ------------------------------------------------------------------------

    def known_roles(self, names: Iterable[Any]) -> frozenset[str]:
        """Return the names that are roles of this version (others grant nothing)."""
        return frozenset(n for n in names if isinstance(n, str) and n in self.roles)

    def scope(self, roles: frozenset[str], entity: str, action: str) -> str | None:
        """Return the broadest scope the roles have for ``action`` on ``entity``, or None."""
        key = (roles, entity, action)
        found = self._decisions.get(key, False)
        if found is not False:
            return found  # type: ignore[return-value]
        result = None
        if roles:
            with self._lock:
                subject = self._subject(roles)
                for scope in SCOPES:
                    if self.enforcer.enforce(subject, self.domain, entity, action, scope):
                        result = scope
                        break
        with self._lock:
            if len(self._decisions) >= DECISION_CACHE_SIZE:
                self._decisions.clear()
            self._decisions[key] = result
        return result

    def capabilities(self, roles: frozenset[str]) -> frozenset[str]:
        """Return the capabilities the roles hold (inherited roles included)."""
        return frozenset(c for c in CAPABILITIES if self.scope(roles, TENANT_OBJECT, c) == "all")

    def closure(self, roles: frozenset[str]) -> tuple[Mapping[str, Any], ...]:
        """Return the documents of the roles and every role they inherit."""
        found = self._closures.get(roles)
        if found is not None:
            return found
        docs: list[Mapping[str, Any]] = []
        pending, seen = sorted(roles), set()
        while pending:
            name = pending.pop()
            if name in seen or name not in self.roles:
                continue
            seen.add(name)
            docs.append(self.roles[name])
            pending.extend(_strings(self.roles[name].get("inherits")))
        result = tuple(docs)
        with self._lock:
            self._closures[roles] = result
        return result

    def field_rules(
        self, roles: frozenset[str], entity: str, all_fields: Iterable[str]
    ) -> FieldRules:
        """Return which fields of ``entity`` the roles hide or keep read-only.

        An entity the roles may not read at all hides every field, so nothing
        of it shows through lookups, includes or audit views.
        """
        key = (roles, entity)
        found = self._fields.get(key)
        if found is not None:
            return found
        if self.scope(roles, entity, "read") is None:
            result = FieldRules(hidden=frozenset(all_fields))
        else:
            readers: list[set[str]] = []
            writers: list[set[str]] = []
            denied_hidden: set[str] = set()
            denied_locked: set[str] = set()
            for doc in self.closure(roles):
                permissions = doc.get("permissions", [])
                for grant in permissions if isinstance(permissions, list) else []:
                    if not isinstance(grant, Mapping) or grant.get("entity") not in (entity, "*"):
                        continue
                    fields = grant.get("fields", {})
                    fields = fields if isinstance(fields, Mapping) else {}
                    hidden = {n for n, how in fields.items() if how == "hidden"}
                    locked = {n for n, how in fields.items() if how in ("hidden", "read_only")}
                    actions = set(_strings(grant.get("actions")))
                    if grant.get("effect", "allow") == "deny":
                        denied_hidden |= hidden
                        denied_locked |= locked
                        continue
                    if "read" in actions:
                        readers.append(hidden)
                    if actions & {"create", "update"}:
                        writers.append(locked)
            hidden_now = (set.intersection(*readers) if readers else set()) | denied_hidden
            locked_now = (set.intersection(*writers) if writers else set()) | denied_locked
            result = FieldRules(frozenset(hidden_now), frozenset(locked_now - hidden_now))
        with self._lock:
            self._fields[key] = result
        return result

    def view(
        self, model: TenantModel, roles: frozenset[str], readable_only: bool = False
    ) -> TenantModel:
        """Return ``model`` as the roles see it: hidden fields taken out (memoised).

        ``readable_only`` also leaves out the entities the roles may not read at
        all (the OpenAPI document of a caller lists only what it can reach).
        """
        key = (id(model), roles, readable_only)
        found = self._views.get(key)
        if found is not None and found[0] is model:
            return found[1]
        view = _restricted_model(
            model,
            {
                name: self.field_rules(
                    roles, name, (f.name for f in e.entity.active_fields())
                ).hidden
                for name, e in model.entities.items()
            },
        )
        if readable_only:
            view = _readable(view, lambda name: self.scope(roles, name, "read") is not None)
        with self._lock:
            if len(self._views) > 256:
                self._views.clear()
            # The model is kept in the value so a recycled id() never matches another model.
            self._views[key] = (model, view)
        return view


# -- restricted models -------------------------------------------------------------------


def _formula_hidden(entity: EntityModel, hidden: set[str], others: Mapping[str, set[str]]) -> None:
    """Add to ``hidden`` the formulas that read a hidden field (they would show its value)."""
    changed = True
    while changed:
        changed = False
        for name, node in entity.formulas.items():
            if name in hidden:
                continue
            for path in references(node):
                own = path[0] in hidden
                lookup = entity.entity.fields.get(path[0])
                hop = (
                    len(path) > 1
                    and lookup is not None
                    and path[1] in others.get(lookup.get("target") or "", set())
                )
                if own or hop:
                    hidden.add(name)
                    changed = True
                    break


def _restricted_scope(scope: Scope, hidden: Mapping[str, set[str]], depth: int = 0) -> Scope:
    concealed = hidden.get(scope.entity, set())
    fields = {}
    for name, info in scope.fields.items():
        if name in concealed:
            continue
        if info.target is not None and depth < 2:
            info = dataclasses.replace(
                info, target=_restricted_scope(info.target, hidden, depth + 1)
            )
        fields[name] = info
    return Scope(scope.entity, fields)


def _restricted_model(model: TenantModel, hidden: Mapping[str, frozenset[str]]) -> TenantModel:
    """Return the model with the given fields (per entity) removed everywhere.

    Lists, filters, sorts, ``fields=``, ``include=``, quick search, related lists
    and the OpenAPI document all read the entity definitions, so a hidden field
    is answered exactly like a field that does not exist.
    """
    concealed = {name: set(names) for name, names in hidden.items()}
    for name, entity in model.entities.items():
        _formula_hidden(entity, concealed.setdefault(name, set()), concealed)
    if not any(concealed.values()):
        return model
    entities: dict[str, EntityModel] = {}
    for name, entity in model.entities.items():
        gone = concealed.get(name, set())
        definition = entity.entity
        if gone:
            doc = dict(definition.doc)
            doc["fields"] = [f for f in doc.get("fields", []) if f.get("name") not in gone]
            doc["search_fields"] = [n for n in doc.get("search_fields", []) if n not in gone]
            definition = EntityDef(
                doc=doc, fields={n: f for n, f in definition.fields.items() if n not in gone}
            )
        entities[name] = dataclasses.replace(
            entity,
            entity=definition,
            scope=_restricted_scope(entity.scope, concealed),
            links={n: t for n, t in entity.links.items() if n not in gone},
            formulas={n: f for n, f in entity.formulas.items() if n not in gone},
        )
    return TenantModel(model.version, model.bundle, model.metadata, entities)


def _readable(model: TenantModel, readable: Callable[[str], bool]) -> TenantModel:
    """Return the model with only the entities ``readable`` accepts."""
    entities = {name: e for name, e in model.entities.items() if readable(name)}
    return TenantModel(model.version, model.bundle, model.metadata, entities)


# -- the policy cache ----------------------------------------------------------------------


class PolicyCache:
    """Compiled policies by (tenant id, metadata version), least recently used dropped first.

    The version comes from the model the request already has (``ModelCache``
    reads the current version on every request), so a publish in one process
    makes every web and worker process build the new policy on its next request.
    """

    def __init__(self, size: int = POLICY_CACHE_SIZE) -> None:
        self._policies: OrderedDict[tuple[uuid.UUID, int], TenantPolicy] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def get(self, tenant_id: uuid.UUID, model: TenantModel) -> TenantPolicy:
        """Return the policy of the tenant at the model's version, building it on first use."""
        key = (tenant_id, model.version)
        with self._lock:
            policy = self._policies.get(key)
            if policy is not None:
                self._policies.move_to_end(key)
                return policy
        policy = TenantPolicy(tenant_id, model.version, model.bundle.doc)
        with self._lock:
            policy = self._policies.setdefault(key, policy)
            while len(self._policies) > self._size:
                self._policies.popitem(last=False)
        return policy

    def clear(self) -> None:
        with self._lock:
            self._policies.clear()


#: The process's policies (every web and worker process has its own).
POLICIES = PolicyCache()


# -- per request ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """What owner assignment needs to know about a prospective owner."""

    user_id: uuid.UUID
    team_id: uuid.UUID | None


@dataclass
class Access:
    """What one caller may do in one tenant at one metadata version.

    Build it with :func:`for_principal`. ``teams`` and ``member`` read the
    control database lazily: an ``own`` or ``all`` request never asks it.
    """

    policy: TenantPolicy
    user_id: uuid.UUID
    roles: frozenset[str]
    team_id: uuid.UUID | None = None
    #: The credential only reads (a read-only API token).
    read_only: bool = False
    #: The credential is limited to these entities (a token's ``entities``); None: all.
    entities: frozenset[str] | None = None
    teams_loader: Callable[[], tuple[uuid.UUID, ...]] = field(default=lambda: (), repr=False)
    member_loader: Callable[[uuid.UUID], Member | None] = field(
        default=lambda _user: None, repr=False
    )

    # -- decisions ------------------------------------------------------------------------

    def scope(self, entity: str, action: str) -> str | None:
        """Return the broadest scope of ``action`` on ``entity`` (own, team, all), or None."""
        if self.read_only and action not in READ_ACTIONS:
            return None
        if self.entities is not None and entity not in self.entities:
            return None
        return self.policy.scope(self.roles, entity, action)

    def allows(self, entity: str, action: str) -> bool:
        """Tell whether the caller may do ``action`` on some records of ``entity``."""
        return self.scope(entity, action) is not None

    def require(self, entity: str, action: str) -> str:
        """Return the scope of ``action`` on ``entity``, or raise :class:`Forbidden`."""
        scope = self.scope(entity, action)
        if scope is None:
            if self.read_only and action not in READ_ACTIONS:
                raise Forbidden("this API token is read-only")
            if self.entities is not None and entity not in self.entities:
                raise Forbidden(f"this API token does not cover '{entity}'")
            raise Forbidden(f"your roles do not allow {action} on '{entity}'")
        return scope

    @cached_property
    def team_ids(self) -> tuple[uuid.UUID, ...]:
        """The caller's team and every team nested below it (what ``team`` scope means)."""
        return tuple(self.teams_loader())

    @property
    def teams(self) -> Sequence[uuid.UUID]:
        """``team_ids`` read only when used: what ``my_team()`` gets in expressions.

        Most requests never evaluate ``my_team()``; this keeps them from paying a
        control-database read for it.
        """
        return _LazyTeams(self)

    def where(self, entity: EntityModel, action: str = "read") -> sa.ColumnElement[bool] | None:
        """Return the SQL condition of the records ``action`` may touch; None means all.

        ``own``: the caller owns the record. ``team``: the record's team is one of
        the caller's teams (nested ones included), or the caller owns it. Raises
        :class:`Forbidden` when the action is not allowed at all.
        """
        return self.predicate(entity.table, self.require(entity.name, action))

    def predicate(self, table: sa.Table, scope: str) -> sa.ColumnElement[bool] | None:
        """Return the SQL condition of one scope over an entity table."""
        if scope == "all":
            return None
        own = table.c.owner_id == self.user_id
        if scope == "own" or not self.team_ids:
            return own
        return sa.or_(table.c.team_id.in_(self.team_ids), own)

    def scope_of(self, entity: EntityModel) -> sa.ColumnElement[bool] | None:
        """Return the read condition of an entity, ``false()`` when it may not be read.

        For embedded and related records: a record the caller may not read is
        left out exactly as if it did not exist.
        """
        scope = self.scope(entity.name, "read")
        if scope is None:
            return sa.false()
        return self.predicate(entity.table, scope)

    # -- fields ---------------------------------------------------------------------------

    def field_rules(self, entity: str, model: TenantModel | None = None) -> FieldRules:
        """Return the hidden and read-only fields of ``entity`` for the caller."""
        names: Iterable[str] = ()
        if model is not None and model.entity(entity) is not None:
            names = [f.name for f in model.entities[entity].entity.active_fields()]
        if self.entities is not None and entity not in self.entities:
            return FieldRules(hidden=frozenset(names))
        return self.policy.field_rules(self.roles, entity, names)

    def hidden_fields(self, entity: str, model: TenantModel | None = None) -> frozenset[str]:
        """Return the fields of ``entity`` that must never reach the caller.

        Pass the ``model`` to get every field name for an entity the caller may not
        read at all; without it such an entity answers an empty set and the caller
        must check :meth:`allows` (export and audit views do).
        """
        return self.field_rules(entity, model).hidden

    def read_only_fields(self, entity: str) -> frozenset[str]:
        """Return the visible fields of ``entity`` the caller may not write."""
        return self.policy.field_rules(self.roles, entity, ()).read_only

    def view(self, model: TenantModel, readable_only: bool = False) -> TenantModel:
        """Return the tenant model with the fields hidden from the caller taken out.

        ``readable_only`` also leaves out the entities the caller may not read at all.
        """
        if self.entities is None:
            return self.policy.view(model, self.roles, readable_only)
        hidden = {name: self.field_rules(name, model).hidden for name in model.entities}
        view = _restricted_model(model, hidden)
        return _readable(view, lambda name: self.allows(name, "read")) if readable_only else view

    # -- capabilities and owners ---------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[str]:
        """Return the tenant-wide capabilities the caller holds with this credential."""
        found = self.policy.capabilities(self.roles)
        return found & READ_CAPABILITIES if self.read_only else found

    def can(self, capability: str) -> bool:
        """Tell whether the caller holds a tenant-wide capability."""
        return capability in self.capabilities

    def assign_owner(self, entity: str, action: str, owner_id: uuid.UUID) -> uuid.UUID | None:
        """Check that the caller may make ``owner_id`` the owner; return that owner's team.

        ``own``: only the caller. ``team``: an active member of one of the caller's
        teams (or the caller). ``all``: any active member of the tenant. Raises
        :class:`OwnerRefused` otherwise, with the same words whether the user does
        not exist or is out of reach, so nothing is learnt about other members.
        """
        scope = self.require(entity, action)
        member = self.member_loader(owner_id)
        refused = OwnerRefused("must be a member of this tenant you may assign records to")
        if member is None:
            raise refused
        if owner_id == self.user_id or scope == "all":
            return member.team_id
        if scope == "team" and member.team_id is not None and member.team_id in self.team_ids:
            return member.team_id
        raise refused


class _LazyTeams(Sequence[uuid.UUID]):
    """The caller's teams as a sequence that reads them on first use."""

    def __init__(self, access: Access) -> None:
        self._access = access

    def __getitem__(self, index: Any) -> Any:
        return self._access.team_ids[index]

    def __len__(self) -> int:
        return len(self._access.team_ids)


def for_principal(
    principal: Principal, model: TenantModel, control_engine: sa.Engine | None = None
) -> Access:
    """Return the access of a request's principal under the tenant's current model.

    ``control_engine`` lets ``team`` scopes read nested teams and owner assignment
    read memberships; without it the caller has no team beyond its own and can
    assign records only to itself.
    """
    tenant_id = principal.tenant_id
    policy = POLICIES.get(tenant_id, model)
    membership = principal.membership
    token = principal.token
    listed = getattr(token, "entities", None) if token is not None else None
    team_id = membership.team_id

    def teams() -> tuple[uuid.UUID, ...]:
        if team_id is None:
            return ()
        if control_engine is None:
            return (team_id,)
        with Session(control_engine) as session:
            return control.teams_within(session, tenant_id, team_id)

    def member(user_id: uuid.UUID) -> Member | None:
        if user_id == principal.user.id:
            return Member(user_id, team_id)
        if control_engine is None:
            return None
        with Session(control_engine) as session:
            row = session.execute(
                sa.select(control.Membership.team_id)
                .join(control.User, control.User.id == control.Membership.user_id)
                .where(
                    control.Membership.tenant_id == tenant_id,
                    control.Membership.user_id == user_id,
                    control.Membership.is_active.is_(True),
                    control.User.is_active.is_(True),
                )
            ).first()
        return None if row is None else Member(user_id, row.team_id)

    return Access(
        policy=policy,
        user_id=principal.user.id,
        roles=policy.known_roles(membership.roles or ()),
        team_id=team_id,
        read_only=principal.read_only,
        entities=None if listed is None else frozenset(_strings(listed)),
        teams_loader=teams,
        member_loader=member,
    )


def capabilities(bundle: Mapping[str, Any], role_names: Iterable[str]) -> set[str]:
    """Return the capabilities of roles under a bundle document that is not published yet.

    The metadata API asks this of a bundle about to be published (will the caller
    keep ``manage_metadata``?), and account checks of roles being given; requests
    against the published version use :attr:`Access.capabilities`.
    """
    roles = bundle.get("roles", []) if isinstance(bundle, Mapping) else []
    try:
        key = json.dumps(roles, sort_keys=True)
    except (TypeError, ValueError):
        return set()
    policy = _roles_policy(key)
    return set(policy.capabilities(policy.known_roles(role_names)))


@functools.lru_cache(maxsize=64)
def _roles_policy(roles_json: str) -> TenantPolicy:
    """A policy of roles alone (no entities): enough for capabilities, cached by content."""
    return TenantPolicy(uuid.UUID(int=0), 0, {"roles": json.loads(roles_json)})
