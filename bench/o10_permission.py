"""O10 of BENCHMARKS.md: the permission decision a request makes, at 1 / 100 / 1,000 tenants.

D3 is Casbin RBAC with domains: every tenant has the ``core`` roles over the five
core entities and 15 entities of its own (20 in all), which metacrm turns into
about 190 policy lines per tenant (``TenantPolicy.policy_lines``): ~190 /
19,000 / 190,000 lines in all. Each tenant has its own ``FastEnforcer`` keyed on
(tenant, entity), built from its published model as in production. The model
is compiled once (``compile_model``) and shared by the tenants, so the memory
figure is the policies' alone.

Timed per request, round-robin over the tenants and over (member, entity,
action) pairs of the five built-in roles, with no database:

- **metacrm**: exactly what a record request does before its SQL —
  ``authz.for_principal`` (policy lookup in the process cache, the Access
  object), ``Access.require`` (the decision: 403 or a scope),
  ``Access.view`` (the caller's model, hidden fields taken out) and
  ``Access.where`` (the scope as a SQL condition). ``team`` scopes use the
  member's own team here (``control_engine=None``): listing nested teams is one
  indexed control-database query, measured with the list in O11;
- **baseline (b)**: one bare ``FastEnforcer.enforce`` on the same policies and
  the same subject, for the scope metacrm grants (Casbin alone, no memo);
- **baseline (a)**: a minimal Flask view answering ``{"ok": true}`` through
  the WSGI test client without any permission check, against the same view
  making metacrm's decision first: the difference is what a request pays.

Also printed: the time to build one tenant's policy (its first request after a
start or a publish), and the memory the tenants' policies hold (``tracemalloc``,
Python allocations, plus the RSS growth).

Run: ``.venv/bin/python -m bench.o10_permission [--quick] [--tenants 1,100,1000]``
"""

from __future__ import annotations

import copy
import gc
import itertools
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flask import Flask, jsonify

from bench.common import (
    Report,
    Row,
    Stats,
    Target,
    argument_parser,
    environment,
    memory_kib,
    sample,
)
from metacrm.runtime import authz, tenancy
from metacrm.runtime.control import Membership, User
from metacrm.runtime.model import TenantModel, compile_model
from metacrm.runtime.principal import Principal

EXTRA_ENTITIES = 15
#: The members of every tenant: name -> roles.
MEMBERS = {
    "admin": ("admin",),
    "sales_manager": ("sales_manager",),
    "sales_rep": ("sales_rep",),
    "service_agent": ("service_agent",),
    "read_only": ("read_only",),
}
ACTIONS = ("read", "update", "create", "delete", "export")
#: p50 of one decision must stay under this (ms) and flat across sizes.
DECISION_TARGET_MS = 0.1
FLAT_TARGET = 1.5


def d3_bundle(extra: int = EXTRA_ENTITIES) -> dict[str, Any]:
    """Return the ``core`` template with ``extra`` small entities of the tenant's own."""
    bundle = copy.deepcopy(tenancy.template_bundle("core"))
    for i in range(extra):
        name = f"custom_{i:02d}"
        bundle["entities"].append(
            {
                "name": name,
                "label": {"en": f"Custom {i}", "zh-CN": f"自定义 {i}"},
                "plural_label": {"en": f"Custom {i}s", "zh-CN": f"自定义 {i}"},
                "title_field": "title",
                "fields": [{"name": "title", "type": "text", "label": {"en": "Title"}}],
            }
        )
    return bundle


@dataclass(frozen=True)
class Call:
    """One request's question: who, on which entity, which action."""

    principal: Principal
    entity: str
    action: str


def _principal(tenant_id: uuid.UUID, roles: Sequence[str]) -> Principal:
    user = User(id=uuid.uuid4(), email=f"{roles[0]}@bench.example", display_name=roles[0])
    membership = Membership(
        tenant_id=tenant_id, user_id=user.id, roles=list(roles), team_id=uuid.uuid4()
    )
    return Principal(user, membership)


def build_world(tenants: int, model: TenantModel) -> tuple[list[Call], dict[str, Any]]:
    """Build every tenant's policy and list the allowed questions, tenant by tenant.

    Returns the calls (round-robin: consecutive calls are in different tenants)
    and the figures of the build: lines, time and memory. The build is timed
    without tracing; the bytes one policy holds are then traced on
    :data:`TRACED_POLICIES` extra policies built the same way (tracemalloc
    slows allocation several times, which would distort the build time).
    """
    authz.POLICIES.clear()
    gc.collect()
    rss_before = memory_kib()["rss"]
    ids = [uuid.UUID(int=i + 1) for i in range(tenants)]
    principals = {t: {m: _principal(t, roles) for m, roles in MEMBERS.items()} for t in ids}
    started = time.perf_counter()
    lines = 0
    for tenant_id in ids:
        policy = authz.POLICIES.get(tenant_id, model)
        p, g = policy.policy_lines()
        lines += len(p) + len(g)
    build_seconds = time.perf_counter() - started
    per_tenant: list[list[Call]] = []
    for tenant_id in ids:
        calls = []
        for principal in principals[tenant_id].values():
            access = authz.for_principal(principal, model)
            for entity in model.entities:
                for action in ACTIONS:
                    if access.allows(entity, action):
                        calls.append(Call(principal, entity, action))
        per_tenant.append(calls)
    gc.collect()
    rss_after = memory_kib()["rss"]
    per_policy = traced_policy_bytes(model, calls_per_tenant=per_tenant[0])
    cold = cold_decisions(model, per_tenant[0])
    # Interleave the tenants: call k of tenant 1, call k of tenant 2, ...
    calls = [c for group in itertools.zip_longest(*per_tenant) for c in group if c is not None]
    figures = {
        "tenants": tenants,
        "policy_lines": lines,
        "build_seconds_per_tenant": build_seconds / tenants,
        "traced_bytes_per_tenant": per_policy,
        "traced_bytes": per_policy * tenants,
        "rss_growth_kib": rss_after - rss_before,
        "questions": len(calls),
        "cold_decision": cold.__dict__,
    }
    return calls, figures


TRACED_POLICIES = 5


def cold_decisions(model: TenantModel, calls_per_tenant: Sequence[Call]) -> Stats:
    """Time each question's first decision on fresh policies (Casbin runs; no memo yet).

    What the first requests after a start or a publish pay, once per role set,
    entity and action; every later one is the memoised decision timed above.
    """
    doc = model.bundle.doc
    durations = []
    clock = time.perf_counter
    for i in range(TRACED_POLICIES):
        policy = authz.TenantPolicy(uuid.UUID(int=2 * 10**9 + i), model.version, doc)
        for call in calls_per_tenant:
            roles = policy.known_roles(call.principal.membership.roles)
            start = clock()
            policy.scope(roles, call.entity, call.action)
            durations.append(clock() - start)
    return Stats.of(durations)


def traced_policy_bytes(model: TenantModel, calls_per_tenant: Sequence[Call]) -> float:
    """Return the bytes one tenant's policy holds once its members' decisions are made."""
    doc = model.bundle.doc
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        kept = []
        for i in range(TRACED_POLICIES):
            policy = authz.TenantPolicy(uuid.UUID(int=10**9 + i), model.version, doc)
            for call in calls_per_tenant:
                roles = policy.known_roles(call.principal.membership.roles)
                policy.scope(roles, call.entity, call.action)
                policy.view(model, roles)
            kept.append(policy)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del kept
    return (held - base) / TRACED_POLICIES


def _cycle(calls: Sequence[Call]) -> Callable[[], Call]:
    position = itertools.cycle(calls)
    return lambda: next(position)


def metacrm_decision(model: TenantModel, calls: Sequence[Call]) -> Callable[[], object]:
    """The permission work of one record request, as the API does it."""
    following = _cycle(calls)

    def decide() -> object:
        call = following()
        access = authz.for_principal(call.principal, model)
        access.require(call.entity, call.action)
        view = access.view(model)
        return access.where(view.entities[call.entity], call.action)

    return decide


def bare_enforcer(model: TenantModel, calls: Sequence[Call]) -> Callable[[], object]:
    """One ``FastEnforcer.enforce`` on the same policy lines and subject (no memo)."""
    prepared = []
    for call in calls:
        access = authz.for_principal(call.principal, model)
        scope = access.require(call.entity, call.action)
        policy = access.policy
        subject = policy._subjects[access.roles]  # the subject metacrm made for the role set
        prepared.append((policy.enforcer, subject, policy.domain, call.entity, call.action, scope))
    position = itertools.cycle(prepared)

    def enforce() -> object:
        enforcer, subject, domain, entity, action, scope = next(position)
        allowed = enforcer.enforce(subject, domain, entity, action, scope)
        if not allowed:
            raise AssertionError("the bare enforcer refused what metacrm allowed")
        return allowed

    return enforce


def wsgi_pair(model: TenantModel, calls: Sequence[Call]) -> tuple[Callable, Callable]:
    """Two requests through Flask: without a permission check, and with metacrm's."""
    app = Flask("o10")
    decide = metacrm_decision(model, calls)

    @app.get("/noauth")
    def noauth() -> Any:
        return jsonify({"ok": True})

    @app.get("/auth")
    def auth() -> Any:
        decide()
        return jsonify({"ok": True})

    client = app.test_client()

    def plain() -> object:
        response = client.get("/noauth")
        assert response.status_code == 200
        return response

    def checked() -> object:
        response = client.get("/auth")
        assert response.status_code == 200
        return response

    return plain, checked


def _alternating(
    first: Callable[[], object], second: Callable[[], object], samples: int, seconds: float
) -> tuple[list[float], list[float]]:
    """Time two calls in turn, sample by sample, so drift and noise hit both alike."""
    for _ in range(50):
        first()
        second()
    clock = time.perf_counter
    a: list[float] = []
    b: list[float] = []
    deadline = clock() + seconds
    while len(a) < samples and (len(a) < 5 or clock() < deadline):
        start = clock()
        first()
        middle = clock()
        second()
        a.append(middle - start)
        b.append(clock() - middle)
    return a, b


def _series(
    points: dict[str, Callable[[], object]],
    pair: tuple[Callable[[], object], Callable[[], object]],
    reps: int,
    seconds: float,
    samples: int,
) -> dict[str, Stats]:
    runs: dict[str, list[Stats]] = {name: [] for name in (*points, "noauth", "auth")}
    for _ in range(reps):
        for name, fn in points.items():
            runs[name].append(
                Stats.of(sample(fn, warmup=50, min_samples=samples, max_seconds=seconds))
            )
        plain, checked = _alternating(*pair, samples=samples, seconds=seconds)
        runs["noauth"].append(Stats.of(plain))
        runs["auth"].append(Stats.of(checked))
    return {name: Stats.median(found) for name, found in runs.items()}


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its tables and return the JSON record."""
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tenants", default=None, help="comma-separated tenant counts (1,100,1000)"
    )
    parser.add_argument("--seconds", type=float, default=None, help="max seconds per point (10)")
    parser.add_argument(
        "--samples", type=int, default=None, help="samples per point and repetition (20,000)"
    )
    args = parser.parse_args(argv)
    sizes = [
        int(s) for s in (args.tenants or ("1,5,20" if args.quick else "1,100,1000")).split(",")
    ]
    if any(s < 1 for s in sizes):
        parser.error("tenant counts must be at least 1")
    seconds = args.seconds if args.seconds is not None else (0.3 if args.quick else 10.0)
    samples = args.samples or (2_000 if args.quick else 20_000)
    reps = args.repetitions or (1 if args.quick else 3)
    report = Report(
        "o10_permission",
        {"tenants": sizes, "seconds": seconds, "samples": samples, "repetitions": reps},
        environment(),
    )
    model = compile_model(1, d3_bundle())
    decisions: dict[int, Stats] = {}
    builds: dict[int, dict[str, Any]] = {}
    for size in sizes:
        calls, figures = build_world(size, model)
        builds[size] = figures
        stats = _series(
            {
                "metacrm": metacrm_decision(model, calls),
                "casbin": bare_enforcer(model, calls),
            },
            wsgi_pair(model, calls),
            reps,
            seconds,
            samples,
        )
        decisions[size] = stats["metacrm"]
        added = stats["auth"].p50 - stats["noauth"].p50
        report.table(
            f"O10 permission decision, {size:,} tenant(s), {figures['policy_lines']:,} policy "
            f"lines (median of {reps})",
            [
                Row(
                    "decision p50 (for_principal+require+view+where)",
                    stats["metacrm"].p50,
                    baseline=stats["casbin"].p50,
                    target=Target.at_most(DECISION_TARGET_MS, "ms"),
                    note=f"n={stats['metacrm'].n}; baseline: bare FastEnforcer.enforce",
                ),
                Row("decision p95", stats["metacrm"].p95, baseline=stats["casbin"].p95),
                Row("decision p99", stats["metacrm"].p99, baseline=stats["casbin"].p99),
                Row(
                    "request with the decision p50",
                    stats["auth"].p50,
                    baseline=stats["noauth"].p50,
                    note="Flask test client; baseline: the same view without auth",
                ),
                Row(
                    "added per request p50",
                    added,
                    target=Target.at_most(DECISION_TARGET_MS, "ms"),
                ),
                Row(
                    "first decision after a publish p50 (Casbin, then memoised)",
                    figures["cold_decision"]["p50"],
                    note=f"p95 {figures['cold_decision']['p95']:.3f} ms; once per role set, "
                    "entity and action",
                ),
                Row(
                    "build one tenant's policy (first request)",
                    figures["build_seconds_per_tenant"] * 1000,
                    note="once per tenant and published version",
                ),
                Row(
                    "memory held by the policies",
                    figures["traced_bytes"] / 1048576,
                    "MiB",
                    note=f"{figures['traced_bytes_per_tenant'] / 1024:,.0f} KiB per tenant "
                    f"(tracemalloc) x {size:,}; RSS grew {figures['rss_growth_kib'] / 1024:,.1f} "
                    "MiB",
                ),
            ],
            "baseline",
            {**figures, "stats": {k: v.__dict__ for k, v in stats.items()}},
        )
    if len(sizes) > 1:
        small, large = min(sizes), max(sizes)
        report.table(
            f"O10 flatness: {large:,} tenants against {small:,}",
            [
                Row(
                    f"decision p50 at {large:,} / at {small:,}",
                    decisions[large].p50,
                    baseline=decisions[small].p50,
                    target=Target.ratio_at_most(FLAT_TARGET),
                ),
                Row(
                    f"decision p95 at {large:,} / at {small:,}",
                    decisions[large].p95,
                    baseline=decisions[small].p95,
                ),
            ],
            f"{small:,} tenant(s)",
        )
    return report.finish(write_json=not args.no_json)


def main(argv: Sequence[str] | None = None) -> int:
    record = run(argv)
    failed = [r for s in record["sections"] for r in s["rows"] if r["verdict"] == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
