"""The permission core without a database: policy lines, decisions, field rules, views."""

from __future__ import annotations

import copy
import statistics
import time
import uuid
from typing import Any

import pytest

from metacrm.runtime import authz
from metacrm.runtime.model import compile_model
from metacrm.runtime.tenancy import template_bundle

ENTITIES = ("customer", "contact", "deal", "interaction", "task")


def core() -> dict[str, Any]:
    return template_bundle("core")


def policy_of(bundle: dict[str, Any], version: int = 1) -> authz.TenantPolicy:
    return authz.TenantPolicy(uuid.uuid4(), version, bundle)


def roles(policy: authz.TenantPolicy, *names: str) -> frozenset[str]:
    return policy.known_roles(names)


def add_role(bundle: dict[str, Any], name: str, **doc: Any) -> dict[str, Any]:
    bundle["roles"].append({"name": name, "label": {"en": name}, **doc})
    return bundle


def access(policy: authz.TenantPolicy, *names: str, **kwargs: Any) -> authz.Access:
    return authz.Access(policy, uuid.uuid4(), roles(policy, *names), **kwargs)


# -- the model and the policy lines ------------------------------------------------------------


def test_the_model_is_shipped_and_uses_named_functions_only() -> None:
    text = authz.model_text()
    assert "[matchers]" in text and "scopeCovers(p.scope, r.scope)" in text
    matcher = text.split("[matchers]")[1]
    assert "eval(" not in matcher and "keyMatch" not in matcher


def test_star_entities_are_expanded_and_inheritance_is_a_grouping_line() -> None:
    policy = policy_of(core())
    p, g = policy.policy_lines()
    admin_reads = {line[2] for line in p if line[0] == "admin" and line[3] == "read"}
    assert admin_reads == set(policy.entity_names) and "*" not in {line[2] for line in p}
    assert ["sales_manager", "sales_rep", policy.domain] in g
    assert all(line[1] == policy.domain for line in p)
    capability_lines = [line for line in p if line[2] == authz.TENANT_OBJECT]
    assert ["admin", policy.domain, "_tenant", "manage_metadata", "all", "allow"] in (
        capability_lines
    )


@pytest.mark.parametrize(
    ("role", "entity", "action", "scope"),
    [
        ("admin", "deal", "delete", "all"),
        ("sales_manager", "customer", "read", "team"),
        ("sales_manager", "customer", "create", "own"),  # inherited from sales_rep
        ("sales_manager", "task", "export", "team"),
        ("sales_rep", "deal", "update", "own"),
        ("sales_rep", "deal", "export", None),
        ("service_agent", "contact", "read", "all"),
        ("service_agent", "interaction", "update", "own"),
        ("service_agent", "interaction", "delete", None),
        ("service_agent", "deal", "read", None),
        ("read_only", "task", "read", "all"),
        ("read_only", "task", "export", None),
        ("read_only", "customer", "update", None),
    ],
)
def test_built_in_roles_decide_the_broadest_scope(
    role: str, entity: str, action: str, scope: str | None
) -> None:
    policy = policy_of(core())
    assert policy.scope(roles(policy, role), entity, action) == scope


def test_several_roles_are_a_union_and_the_broadest_scope_wins() -> None:
    policy = policy_of(core())
    both = roles(policy, "sales_rep", "service_agent")
    assert policy.scope(both, "customer", "read") == "all"  # agent
    assert policy.scope(both, "customer", "delete") == "own"  # rep
    assert policy.scope(both, "interaction", "delete") == "own"


def test_an_explicit_deny_wins_over_grants_of_any_role() -> None:
    bundle = add_role(
        core(),
        "no_deals",
        permissions=[{"entity": "deal", "actions": ["delete", "read"], "effect": "deny"}],
    )
    bundle = add_role(
        bundle,
        "careful",
        inherits=["admin"],
        permissions=[{"entity": "*", "actions": ["delete"], "scope": "all", "effect": "deny"}],
    )
    policy = policy_of(bundle)
    assert policy.scope(roles(policy, "admin", "no_deals"), "deal", "read") is None
    assert policy.scope(roles(policy, "admin", "no_deals"), "customer", "read") == "all"
    careful = roles(policy, "careful")
    assert policy.scope(careful, "task", "delete") is None
    assert policy.scope(careful, "task", "update") == "all"
    assert "manage_metadata" in policy.capabilities(careful)


@pytest.mark.parametrize(
    "hostile",
    ["a,b", "admin, *", "x]", "sales_rep\n p, evil", "Admin", "", "a" * 64, "roles:admin"],
)
def test_hostile_role_names_grant_nothing_and_write_no_policy_line(hostile: str) -> None:
    bundle = add_role(
        core(),
        hostile,
        permissions=[{"entity": "*", "actions": ["read", "delete"], "scope": "all"}],
        capabilities=["manage_metadata"],
    )
    bundle["roles"][0] = {**bundle["roles"][0], "inherits": [hostile]}
    policy = policy_of(bundle)
    p, g = policy.policy_lines()
    assert all(hostile not in line for line in p + g)
    assert roles(policy, hostile) == frozenset()
    assert policy.scope(roles(policy, hostile), "customer", "read") is None
    # A membership naming it alongside a real role gets the real role's rights only.
    mixed = roles(policy, hostile, "sales_rep")
    assert mixed == frozenset({"sales_rep"})
    assert policy.capabilities(mixed) == frozenset()


def test_unknown_actions_scopes_and_entities_are_ignored() -> None:
    bundle = add_role(
        core(),
        "odd",
        permissions=[
            {"entity": "nosuch", "actions": ["read"], "scope": "all"},
            {"entity": "task", "actions": ["read", "fly"], "scope": "galaxy"},
            {"entity": "task", "actions": ["update"], "scope": "team"},
        ],
    )
    policy = policy_of(bundle)
    odd = roles(policy, "odd")
    assert policy.scope(odd, "nosuch", "read") is None
    assert policy.scope(odd, "task", "read") is None
    assert policy.scope(odd, "task", "fly") is None
    assert policy.scope(odd, "task", "update") == "team"


def test_capabilities_follow_inheritance_and_the_token() -> None:
    policy = policy_of(core())
    assert policy.capabilities(roles(policy, "admin")) == frozenset(authz.CAPABILITIES)
    assert policy.capabilities(roles(policy, "sales_manager")) == {"export"}
    assert access(policy, "admin", read_only=True).capabilities == {"view_audit", "export"}
    assert access(policy, "admin").can("manage_users")
    assert not access(policy, "sales_rep").can("export")
    # An unpublished bundle (the metadata API's lock-out check) is asked the same way.
    assert "manage_metadata" in authz.capabilities(core(), ["admin"])
    assert authz.capabilities(core(), ["sales_rep", "admin, *"]) == set()
    assert authz.capabilities({"roles": "not a list"}, ["admin"]) == set()


# -- per request ------------------------------------------------------------------------------


def test_tokens_narrow_what_roles_allow() -> None:
    policy = policy_of(core())
    read_only = access(policy, "admin", read_only=True)
    assert read_only.scope("customer", "read") == "all"
    assert read_only.scope("customer", "update") is None
    with pytest.raises(authz.Forbidden, match="read-only"):
        read_only.require("customer", "delete")
    limited = access(policy, "admin", entities=frozenset({"customer"}))
    assert limited.scope("customer", "delete") == "all"
    with pytest.raises(authz.Forbidden, match="does not cover 'deal'"):
        limited.require("deal", "read")
    with pytest.raises(authz.Forbidden, match="do not allow read on 'deal'"):
        access(policy, "service_agent").require("deal", "read")


def test_scopes_become_sql_conditions() -> None:
    policy = policy_of(core())
    model = compile_model(1, core())
    table = model.entities["deal"].table
    me, east, north = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    def sql(condition: Any) -> str:
        return str(condition.compile(compile_kwargs={"literal_binds": True}))

    rep = authz.Access(policy, me, roles(policy, "sales_rep"))
    assert sql(rep.where(model.entities["deal"], "update")) == f"deal.owner_id = '{me.hex}'"
    manager = authz.Access(
        policy, me, roles(policy, "sales_manager"), east, teams_loader=lambda: (east, north)
    )
    text = sql(manager.where(model.entities["deal"], "read"))
    assert "deal.team_id IN" in text and east.hex in text and north.hex in text
    assert f"deal.owner_id = '{me.hex}'" in text
    # A manager without a team reaches only its own records.
    alone = authz.Access(policy, me, roles(policy, "sales_manager"))
    assert sql(alone.where(model.entities["deal"], "read")) == f"deal.owner_id = '{me.hex}'"
    assert authz.Access(policy, me, roles(policy, "admin")).where(model.entities["deal"]) is None
    agent = authz.Access(policy, me, roles(policy, "service_agent"))
    assert sql(agent.scope_of(model.entities["deal"])) == "false"
    assert agent.predicate(table, "all") is None
    with pytest.raises(authz.Forbidden):
        agent.where(model.entities["deal"], "read")


def test_teams_are_read_only_when_a_team_scope_needs_them() -> None:
    policy = policy_of(core())
    model = compile_model(1, core())
    asked: list[int] = []

    def teams() -> tuple[uuid.UUID, ...]:
        asked.append(1)
        return (uuid.uuid4(),)

    rep = authz.Access(policy, uuid.uuid4(), roles(policy, "sales_rep"), teams_loader=teams)
    rep.where(model.entities["task"], "read")
    assert asked == []
    manager = authz.Access(policy, uuid.uuid4(), roles(policy, "sales_manager"), teams_loader=teams)
    manager.where(model.entities["task"], "read")
    manager.where(model.entities["deal"], "read")
    assert asked == [1]


def test_owner_assignment_follows_the_scope_of_the_action() -> None:
    policy = policy_of(core())
    me, mate, stranger, outsider = (uuid.uuid4() for _ in range(4))
    east, west = uuid.uuid4(), uuid.uuid4()
    members = {me: east, mate: east, stranger: west}

    def member(user: uuid.UUID) -> authz.Member | None:
        return authz.Member(user, members[user]) if user in members else None

    def who(*names: str) -> authz.Access:
        return authz.Access(
            policy,
            me,
            roles(policy, *names),
            east,
            teams_loader=lambda: (east,),
            member_loader=member,
        )

    rep, manager, admin = who("sales_rep"), who("sales_manager"), who("admin")
    assert rep.assign_owner("task", "update", me) == east
    for target in (mate, stranger, outsider):
        with pytest.raises(authz.OwnerRefused):
            rep.assign_owner("task", "update", target)
    assert manager.assign_owner("task", "update", mate) == east
    with pytest.raises(authz.OwnerRefused):
        manager.assign_owner("task", "update", stranger)
    with pytest.raises(authz.OwnerRefused):
        manager.assign_owner("task", "create", mate)  # create is 'own' for a manager
    assert admin.assign_owner("task", "create", stranger) == west
    with pytest.raises(authz.OwnerRefused) as refused:
        admin.assign_owner("task", "create", outsider)
    with pytest.raises(authz.OwnerRefused) as other:
        rep.assign_owner("task", "update", stranger)
    assert str(refused.value) == str(other.value)  # nothing tells members from strangers


# -- fields ----------------------------------------------------------------------------------


def secured() -> dict[str, Any]:
    bundle = copy.deepcopy(core())
    for entity in bundle["entities"]:
        if entity["name"] == "customer":
            entity["fields"].append(
                {
                    "name": "double_value",
                    "type": "formula",
                    "label": {"en": "Double"},
                    "expression": "lifetime_value * 2",
                    "result_type": "decimal",
                }
            )
    for role in bundle["roles"]:
        if role["name"] == "sales_rep":
            for grant in role["permissions"]:
                if grant["entity"] == "customer":
                    grant["fields"] = {
                        "phone": "hidden",
                        "lifetime_value": "hidden",
                        "level": "read_only",
                    }
    add_role(
        bundle,
        "masked",
        permissions=[
            {
                "entity": "customer",
                "actions": ["export"],
                "effect": "deny",
                "fields": {"email": "hidden", "city": "read_only"},
            },
        ],
    )
    return bundle


def test_a_field_is_hidden_only_if_every_granting_permission_hides_it() -> None:
    policy = policy_of(secured())
    names = ["name", "phone", "lifetime_value", "level", "email"]
    rep = policy.field_rules(roles(policy, "sales_rep"), "customer", names)
    assert rep.hidden == {"phone", "lifetime_value"} and rep.read_only == {"level"}
    # The manager inherits the rep's grant, but its own grant hides nothing.
    manager = policy.field_rules(roles(policy, "sales_manager"), "customer", names)
    assert manager == authz.FieldRules()
    # So does a second role that reads the entity without restrictions.
    both = policy.field_rules(roles(policy, "sales_rep", "read_only"), "customer", names)
    assert both.hidden == frozenset()
    # ... but only the rep's grant writes, and it writes none of them.
    assert both.read_only == {"level", "phone", "lifetime_value"}
    # Fields on a deny always apply, whatever else grants.
    masked = policy.field_rules(roles(policy, "admin", "masked"), "customer", names)
    assert masked.hidden == {"email"} and masked.read_only == {"city"}
    # An entity the roles may not read hides every field.
    agent = policy.field_rules(roles(policy, "service_agent"), "deal", ["name", "amount"])
    assert agent.hidden == {"name", "amount"}


def test_the_view_takes_hidden_fields_out_everywhere() -> None:
    bundle = secured()
    policy = policy_of(bundle)
    model = compile_model(1, bundle)
    view = policy.view(model, roles(policy, "sales_rep"))
    customer = view.entities["customer"]
    for name in ("phone", "lifetime_value", "double_value"):  # the formula reads a hidden field
        assert customer.field(name) is None
        assert name not in customer.scope.fields
    assert customer.field("level") is not None and "double_value" not in customer.formulas
    assert "phone" not in customer.entity.doc["search_fields"]
    # One hop through a lookup cannot reach it either.
    target = view.entities["contact"].scope.fields["customer"].target
    assert target is not None and "phone" not in target.fields and "name" in target.fields
    assert view.entities["customer"].table is model.entities["customer"].table
    # Views are memoised per model and role set; a role set with nothing hidden gets the model.
    assert policy.view(model, roles(policy, "sales_rep")) is view
    assert policy.view(model, roles(policy, "admin")) is model
    readable = policy.view(model, roles(policy, "service_agent"), readable_only=True)
    assert "deal" not in readable.entities and "customer" in readable.entities


# -- caching and cost -------------------------------------------------------------------------


def test_policies_are_cached_per_tenant_and_version() -> None:
    cache = authz.PolicyCache(size=3)
    tenant = uuid.uuid4()
    v1, v2 = compile_model(1, core()), compile_model(2, secured())
    first = cache.get(tenant, v1)
    assert cache.get(tenant, v1) is first
    second = cache.get(tenant, v2)
    assert second is not first and second.version == 2
    assert cache.get(uuid.uuid4(), v1) is not first
    for _ in range(3):
        cache.get(uuid.uuid4(), v1)
    assert cache.get(tenant, v1) is not first  # dropped as least recently used


def test_a_decision_costs_under_100_microseconds_whatever_the_number_of_tenants() -> None:
    model = compile_model(1, core())
    cache = authz.PolicyCache()
    tenants = [uuid.uuid4() for _ in range(200)]
    people = [
        authz.Access(cache.get(t, model), uuid.uuid4(), frozenset({"sales_manager"}))
        for t in tenants
    ]
    for person in people:
        person.scope("customer", "read")  # the first decision of a role set runs Casbin

    def p50(group: list[authz.Access]) -> float:
        samples = []
        for i in range(2000):
            person = group[i % len(group)]
            start = time.perf_counter()
            person.scope(ENTITIES[i % 5], "read")
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    one, many = p50(people[:1]), p50(people)
    assert one < 100e-6 and many < 100e-6
    assert many < max(one * 5, 5e-6)


def test_the_first_decision_asks_casbin_and_later_ones_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    policy = policy_of(core())
    calls: list[tuple[Any, ...]] = []
    enforce = policy.enforcer.enforce

    def counting(*args: Any) -> bool:
        calls.append(args)
        return enforce(*args)

    monkeypatch.setattr(policy.enforcer, "enforce", counting)
    rep = roles(policy, "sales_rep")
    assert policy.scope(rep, "task", "read") == "own"
    asked = len(calls)
    assert asked == 3  # all, team, own
    assert policy.scope(rep, "task", "read") == "own"
    assert len(calls) == asked
