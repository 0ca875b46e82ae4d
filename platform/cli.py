"""The ``metacrm`` command: ``metacrm <noun> <verb>``.

Every command builds its own ``Platform`` from the settings, so the CLI and the
web application go through the same services and the same checks.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import sqlalchemy as sa

from metacrm.metadata import jsondoc
from metacrm.metadata.loader import validate_folder
from metacrm.metadata.validation import BundleInvalid, Problem, validate_bundle
from metacrm.runtime import accounts, audittrail, mail, metastore, settings, tenancy, tokens
from metacrm.runtime.api import audit as audit_api
from metacrm.runtime.control import Tenant, User
from metacrm.runtime.metastore import Actor
from metacrm.runtime.migrator import DataCheckFailed
from metacrm.runtime.passwords import generate_password, hash_password
from metacrm.runtime.platform import Platform
from metacrm.runtime.tokens import create_token

DEMO_SLUG = "demo"
DEMO_EMAIL = "admin@demo.metacrm.local"
MAX_BUNDLE_FILE = 10 * 1024 * 1024


def _fail(message: str, code: int = 1) -> NoReturn:
    click.secho(f"Error: {message}", fg="red", err=True)
    sys.exit(code)


def _platform(ctx: click.Context) -> Platform:
    if ctx.obj is None:
        try:
            ctx.obj = Platform(settings.load())
        except settings.SettingsError as exc:
            _fail(str(exc), 2)
        try:
            ctx.obj.init_control()
        except sa.exc.SQLAlchemyError as exc:
            url = sa.make_url(ctx.obj.settings.database_url).render_as_string(hide_password=True)
            _fail(f"cannot use the control database {url}: {type(exc.orig or exc).__name__}")
        ctx.call_on_close(ctx.obj.close)
    return ctx.obj


def _print_problems(problems: list[Problem]) -> None:
    for problem in problems:
        click.echo(f"  {problem.pointer or '/'}: {problem.message}")
        if problem.hint:
            click.echo(f"      hint: {problem.hint}")


def _tenant(platform: Platform, slug: str) -> Tenant:
    with platform.session() as session:
        tenant = platform.tenant(session, slug)
    if tenant is None:
        _fail(f"there is no tenant '{slug}'")
    return tenant


def _load(path: str) -> dict[str, Any]:
    """Read and validate a bundle folder, or a bundle JSON file (as ``meta export`` writes)."""
    if Path(path).is_file():
        try:
            doc = jsondoc.loads(Path(path).read_bytes(), max_bytes=MAX_BUNDLE_FILE)
        except OSError as exc:
            _fail(f"cannot read {path}: {exc.strerror}")
        except jsondoc.DocumentError as exc:
            _fail(f"{path}: {exc}")
        problems = validate_bundle(doc)
    else:
        loaded, problems = validate_folder(path)
        doc = loaded.doc
    if problems:
        click.echo(f"{path}: {len(problems)} problem(s)")
        _print_problems(problems)
        sys.exit(1)
    return doc


@click.group()
@click.version_option(package_name="metacrm")
def main() -> None:
    """metacrm: a low-code CRM platform."""


# -- serve ----------------------------------------------------------------------------------


@main.command()
@click.option("--host", default=None, help="Address to listen on (setting: host).")
@click.option("--port", default=None, type=click.IntRange(1, 65535), help="Port (setting: port).")
@click.option("--demo", is_flag=True, help="Create the demo tenant with sample data if missing.")
def serve(host: str | None, port: int | None, demo: bool) -> None:
    """Run the development server."""
    from metacrm.app import create_app

    try:
        app = create_app()
    except settings.SettingsError as exc:
        _fail(str(exc), 2)
    platform: Platform = app.extensions["metacrm"]
    host = host or platform.settings.host
    port = port or platform.settings.port
    base = f"http://{host}:{port}"
    for item in tenancy.list_tenants(platform):
        platform.store(item).upgrade_platform_tables()
    if demo:
        email, password, token = _ensure_demo(platform)
        click.echo("")
        click.secho("metacrm is running with a demo tenant", bold=True)
        click.echo(f"  URL:        {base}/login")
        click.echo(f"  Tenant API: {base}/t/{DEMO_SLUG}/api/v1/meta/")
        click.echo(f"  Login:      {email} / {password}")
        click.echo(f"  API token:  {token}")
        click.echo(
            f"  Try:        curl -H 'Authorization: Bearer {token}' "
            f"{base}/t/{DEMO_SLUG}/api/v1/meta/versions"
        )
        click.echo("")
    app.run(host=host, port=port, debug=False, use_reloader=False)


def _ensure_demo(platform: Platform) -> tuple[str, str, str]:
    """Create the demo tenant once; return its admin login and API token.

    When the demo exists but its saved credentials are gone, the admin gets a new
    password and a new token: the demo's data is never deleted behind anyone's back.
    """
    from metacrm.runtime.demo import load_sample

    credentials = platform.settings.instance_dir / "demo_credentials.json"
    if credentials.exists():
        saved = json.loads(credentials.read_text("utf-8"))
        with platform.session() as session:
            if platform.tenant(session, DEMO_SLUG) is not None:
                return saved["email"], saved["password"], saved["token"]
    with platform.session() as session:
        exists = platform.tenant(session, DEMO_SLUG) is not None
    if not exists:
        created = tenancy.create_tenant(
            platform, DEMO_SLUG, "Demo Trading Co. 演示贸易公司", admin_email=DEMO_EMAIL
        )
        assert created.admin is not None
        load_sample(platform, platform.store(created.tenant), created.admin.id)
    password = generate_password()
    with platform.session() as session:
        tenant = platform.tenant(session, DEMO_SLUG)
        admin = session.scalar(sa.select(User).where(User.email == DEMO_EMAIL))
        if tenant is None or admin is None:
            _fail(
                f"the demo tenant exists without its admin {DEMO_EMAIL}; delete it with "
                f"'metacrm tenant delete {DEMO_SLUG} --confirm' to start afresh"
            )
        admin.password_hash = hash_password(password)
        _, token = create_token(session, tenant, admin, "demo")
    credentials.write_text(
        json.dumps({"email": DEMO_EMAIL, "password": password, "token": token}), "utf-8"
    )
    credentials.chmod(0o600)
    if exists:
        click.echo("The demo tenant was kept; its admin got a new password and token.")
    return DEMO_EMAIL, password, token


# -- tenant ---------------------------------------------------------------------------------


@main.group()
def tenant() -> None:
    """Create, list and delete tenants."""


@tenant.command("create")
@click.argument("slug")
@click.option("--name", required=True, help="The company's name.")
@click.option("--template", default="core", show_default=True, help="Bundle to start from.")
@click.option("--admin-email", required=True, help="Email of the first admin.")
@click.option(
    "--admin-password", default=None, help="Password (generated and printed if left out)."
)
@click.option("--sample-data", is_flag=True, help="Load the template's sample records.")
@click.pass_context
def tenant_create(
    ctx: click.Context,
    slug: str,
    name: str,
    template: str,
    admin_email: str,
    admin_password: str | None,
    sample_data: bool,
) -> None:
    """Create a tenant from a template, with its first admin."""
    platform = _platform(ctx)
    try:
        created = tenancy.create_tenant(platform, slug, name, template, admin_email, admin_password)
    except tenancy.TenantError as exc:
        _fail(str(exc))
    except BundleInvalid as exc:
        _print_problems(exc.problems)
        _fail(f"template {template!r} is not valid")
    if sample_data:
        from metacrm.runtime.demo import SampleError, load_sample

        try:
            count = load_sample(
                platform,
                platform.store(created.tenant),
                created.admin.id if created.admin else None,
                template,
            )
        except SampleError as exc:
            _fail(f"the tenant was created, but its sample data was not loaded: {exc}")
        click.echo(f"Loaded {count} sample records.")
    click.echo(f"Created tenant '{slug}' ({name}) from template '{template}'.")
    click.echo(f"Admin: {admin_email.lower()}")
    if created.generated_password:
        click.echo(f"Password (shown once): {created.generated_password}")


@tenant.command("list")
@click.pass_context
def tenant_list(ctx: click.Context) -> None:
    """List tenants."""
    for item in tenancy.list_tenants(_platform(ctx)):
        where = item.schema or "sqlite file"
        click.echo(
            f"{item.slug}\t{item.name}\t{item.template}\t{where}\t{item.created_at:%Y-%m-%d}"
        )


@tenant.command("delete")
@click.argument("slug")
@click.option("--confirm", is_flag=True, help="Required: the tenant's data is deleted for good.")
@click.pass_context
def tenant_delete(ctx: click.Context, slug: str, confirm: bool) -> None:
    """Delete a tenant and all its data."""
    if not confirm:
        _fail(f"deleting '{slug}' removes all its data; repeat with --confirm")
    try:
        tenancy.delete_tenant(_platform(ctx), slug)
    except tenancy.TenantError as exc:
        _fail(str(exc))
    click.echo(f"Deleted tenant '{slug}'.")


@tenant.command("upgrade")
@click.argument("slug", required=False)
@click.pass_context
def tenant_upgrade(ctx: click.Context, slug: str | None) -> None:
    """Add the platform tables a newer metacrm needs (all tenants, or one)."""
    platform = _platform(ctx)
    chosen = [t for t in tenancy.list_tenants(platform) if slug is None or t.slug == slug]
    if slug is not None and not chosen:
        _fail(f"there is no tenant '{slug}'")
    for item in chosen:
        platform.store(item).upgrade_platform_tables()
    click.echo(f"Upgraded {len(chosen)} tenant(s).")


# -- user and team --------------------------------------------------------------------------


def _work(platform: Platform, slug: str) -> Any:
    """Return a unit of work in the tenant, acting as the command line."""
    return accounts.work(platform, _tenant(platform, slug), accounts.CLI_ACTOR)


def _member(w: accounts.Work, email: str) -> accounts.Member:
    try:
        address = accounts.normalise_email(email)
    except accounts.AccountError as exc:
        _fail(exc.message)
    member = accounts.member_by_email(w.session, w.tenant.id, address)
    if member is None:
        _fail(f"{address} is not a member of '{w.tenant.slug}'")
    return member


@main.group()
def user() -> None:
    """Add, list, deactivate and reactivate a tenant's members."""


@user.command("add")
@click.option("--tenant", "slug", required=True)
@click.option("--email", required=True, help="The person's email address (their login).")
@click.option("--role", "roles", multiple=True, required=True, help="A role (repeatable).")
@click.option("--team", default=None, help="API name of the member's team.")
@click.option("--manager", default=None, help="Email of the member they report to.")
@click.option(
    "--password", default=None, help="Set this password instead of printing an invitation link."
)
@click.option(
    "--lang",
    type=click.Choice(mail.LANGUAGES),
    default="en",
    show_default=True,
    help="Language of the invitation mail.",
)
@click.pass_context
def user_add(
    ctx: click.Context,
    slug: str,
    email: str,
    roles: tuple[str, ...],
    team: str | None,
    manager: str | None,
    password: str | None,
    lang: str,
) -> None:
    """Make a person a member; without --password print a single-use invitation link."""
    platform = _platform(ctx)
    lifetime = dt.timedelta(hours=platform.settings.invitation_hours)
    try:
        with _work(platform, slug) as w:
            added = accounts.add_member(
                w,
                email=email,
                roles=list(roles),
                team=team,
                manager_email=manager,
                password=password,
                invitation_lifetime=lifetime,
            )
    except accounts.AccountError as exc:
        _fail(f"{exc.message}; nothing was changed")
    address = added.member.user.email
    click.echo(f"Added {address} to '{slug}' as {', '.join(added.member.membership.roles)}.")
    if added.invitation is None:
        if not added.new_login and password is None:
            click.echo("They sign in with the password they already have.")
        return
    url = mail.link(platform.settings, mail.invitation_path(added.invitation))
    assert added.invitation_expires is not None
    until = f"{added.invitation_expires:%Y-%m-%d %H:%M}"
    click.echo(f"Invitation link (single use, until {until} UTC):")
    click.echo(url)
    if mail.enabled(platform.settings):
        subject, body = mail.render(
            "invitation",
            lang,
            tenant=_tenant(platform, slug).name,
            inviter="An administrator",
            link=url,
            expires=until,
        )
        try:
            mail.send(platform.settings, address, subject, body)
            click.echo(f"The link was also mailed to {address}.")
        except mail.MailError as exc:
            click.secho(f"The mail was not sent: {exc}. Pass the link on yourself.", fg="yellow")


@user.command("list")
@click.option("--tenant", "slug", required=True)
@click.pass_context
def user_list(ctx: click.Context, slug: str) -> None:
    """List a tenant's members: email, roles, team, manager, state."""
    platform = _platform(ctx)
    item = _tenant(platform, slug)
    with platform.session() as session:
        members = accounts.list_members(session, item.id)
    for member in members:
        d = member.describe()
        state = "active" if d["active"] else "deactivated"
        if d["pending_invitation"]:
            state += " (invited)"
        click.echo(
            f"{d['email']}\t{','.join(d['roles'])}\t{d['team'] or '-'}\t"
            f"{d['manager'] or '-'}\t{state}"
        )


@user.command("deactivate")
@click.option("--tenant", "slug", required=True)
@click.option("--email", required=True)
@click.pass_context
def user_deactivate(ctx: click.Context, slug: str, email: str) -> None:
    """Deactivate a member: their tokens and login sessions stop working at once."""
    platform = _platform(ctx)
    try:
        with _work(platform, slug) as w:
            member = accounts.deactivate(w, _member(w, email).user.id)
    except accounts.AccountError as exc:
        _fail(f"{exc.message}; nothing was changed")
    click.echo(f"Deactivated {member.user.email} in '{slug}'; their tokens are revoked.")


@user.command("reset-mfa")
@click.option("--email", required=True)
@click.pass_context
def user_reset_mfa(ctx: click.Context, email: str) -> None:
    """Remove a login's second factor in every tenant and end its sessions (audited)."""
    from metacrm.runtime import mfa

    platform = _platform(ctx)
    try:
        slugs, ended = mfa.operator_reset(platform, email)
    except mfa.MfaError as exc:
        _fail(f"{exc}; nothing was changed")
    click.echo(
        f"Two-step sign-in of {email.strip().lower()} is off; {ended} session(s) ended; "
        f"audited in {', '.join(slugs) or 'no tenant'}."
    )


@user.command("reactivate")
@click.option("--tenant", "slug", required=True)
@click.option("--email", required=True)
@click.pass_context
def user_reactivate(ctx: click.Context, slug: str, email: str) -> None:
    """Let a deactivated member in again (revoked tokens stay revoked)."""
    platform = _platform(ctx)
    try:
        with _work(platform, slug) as w:
            member = accounts.reactivate(w, _member(w, email).user.id)
    except accounts.AccountError as exc:
        _fail(f"{exc.message}; nothing was changed")
    click.echo(f"Reactivated {member.user.email} in '{slug}'.")


@main.group()
def team() -> None:
    """Add and list a tenant's teams."""


@team.command("add")
@click.option("--tenant", "slug", required=True)
@click.argument("name")
@click.option("--label", required=True, help="The name people read.")
@click.option("--parent", default=None, help="API name of the team this one belongs to.")
@click.pass_context
def team_add(ctx: click.Context, slug: str, name: str, label: str, parent: str | None) -> None:
    """Create a team (teams nest: a team sees its sub-teams' records)."""
    platform = _platform(ctx)
    try:
        with _work(platform, slug) as w:
            accounts.create_team(w, name, label, parent)
    except accounts.AccountError as exc:
        _fail(f"{exc.message}; nothing was changed")
    click.echo(f"Created team '{name}' in '{slug}'.")


@team.command("list")
@click.option("--tenant", "slug", required=True)
@click.pass_context
def team_list(ctx: click.Context, slug: str) -> None:
    """List a tenant's teams: name, label, parent, members."""
    platform = _platform(ctx)
    item = _tenant(platform, slug)
    with platform.session() as session:
        teams = accounts.list_teams(session, item.id)
    for t in teams:
        click.echo(f"{t['name']}\t{t['label']}\t{t['parent'] or '-'}\t{t['members']}")


# -- token ----------------------------------------------------------------------------------


@main.group()
def token() -> None:
    """API tokens: create (shown once), list, revoke."""


_TOKEN_OPTIONS = {"name": "--name", "entities": "--entity", "expires_days": "--expires-days"}


@token.command("create")
@click.option("--tenant", "slug", required=True)
@click.option("--user", "email", required=True, help="Email of a member of the tenant.")
@click.option("--name", required=True, help="What the token is for.")
@click.option("--read-only", is_flag=True, help="Refuse writes made with this token.")
@click.option(
    "--entity", "entities", multiple=True, help="Limit the token to this entity (repeatable)."
)
@click.option("--expires-days", type=int, default=None, help="Expire after this many days.")
@click.pass_context
def token_create(
    ctx: click.Context,
    slug: str,
    email: str,
    name: str,
    read_only: bool,
    entities: tuple[str, ...],
    expires_days: int | None,
) -> None:
    """Create an API token for a member and print it (once)."""
    platform = _platform(ctx)
    try:
        with _work(platform, slug) as w:
            member = _member(w, email)
            if not member.membership.is_active or not member.user.is_active:
                _fail(f"{member.user.email} is deactivated in '{slug}'")
            problems, expires = tokens.request_problems(
                name,
                list(entities) if entities else None,
                expires_days,
                accounts.entity_names(w.bundle),
            )
            if problems:
                _fail("; ".join(f"{_TOKEN_OPTIONS[p.field]}: {p}" for p in problems))
            _, secret = accounts.issue_token(
                w, member.user.id, name, read_only, expires, list(entities) if entities else None
            )
    except accounts.AccountError as exc:
        _fail(f"{exc.message}; nothing was changed")
    click.echo(secret)


@token.command("list")
@click.option("--tenant", "slug", required=True)
@click.option("--user", "email", default=None, help="Only this member's tokens.")
@click.pass_context
def token_list(ctx: click.Context, slug: str, email: str | None) -> None:
    """List a tenant's tokens (never their secrets)."""
    platform = _platform(ctx)
    item = _tenant(platform, slug)
    with platform.session() as session:
        user_id = None
        if email is not None:
            member = accounts.member_by_email(session, item.id, email)
            if member is None:
                _fail(f"{email} is not a member of '{slug}'")
            user_id = member.user.id
        owners = dict(session.execute(sa.select(User.id, User.email)).all())
        for t in tokens.list_tokens(session, item.id, user_id):
            d = tokens.describe(t)
            scope = "read-only" if d["read_only"] else "read-write"
            if d["entities"] is not None:
                scope += " on " + ",".join(d["entities"])
            click.echo(
                f"{d['id']}\t{owners.get(t.user_id, '?')}\t{d['name']}\t{scope}\t{d['state']}\t"
                f"expires {(d['expires_at'] or 'never')[:16]}\t"
                f"last used {(d['last_used_at'] or 'never')[:16]}"
            )


@token.command("revoke")
@click.option("--tenant", "slug", required=True)
@click.argument("token_id")
@click.pass_context
def token_revoke(ctx: click.Context, slug: str, token_id: str) -> None:
    """Revoke a token at once (TOKEN_ID as 'token list' shows it)."""
    platform = _platform(ctx)
    with _work(platform, slug) as w:
        item = tokens.find_token(w.session, w.tenant.id, token_id.strip())
        if item is None:
            _fail(f"there is no token {token_id!r} in '{slug}'")
        if not tokens.revoke_token(item):
            _fail(f"token {token_id} was revoked already")
        owner = w.session.get_one(User, item.user_id)
        accounts.audit_token(w, "token.revoked", item, owner)
    click.echo(f"Revoked token {item.id.hex} ({item.name}).")


# -- operator -------------------------------------------------------------------------------


@main.group()
def operator() -> None:
    """Platform operators: the operator console's logins (no tenant's members)."""


@operator.command("create")
@click.option("--email", required=True)
@click.option("--password", default=None, help="Password (generated and printed if left out).")
@click.pass_context
def operator_create(ctx: click.Context, email: str, password: str | None) -> None:
    """Create an operator who signs in at /operator/login."""
    from metacrm.runtime import operators

    platform = _platform(ctx)
    try:
        _, generated = operators.create_operator(platform, email, password)
    except accounts.AccountError as exc:
        _fail(exc.message)
    click.echo(f"Created operator {email.strip().lower()}; sign in at /operator/login.")
    if generated:
        click.echo(f"Password (shown once): {generated}")


# -- meta -----------------------------------------------------------------------------------


@main.group()
def meta() -> None:
    """Validate, plan and publish metadata."""


@meta.command("validate")
@click.argument("folder", type=click.Path(exists=True))
def meta_validate(folder: str) -> None:
    """Validate a bundle folder and list every problem."""
    _load(folder)
    click.echo(f"{folder}: valid")


def _print_plan(plan: Any, failures: list[Any] = ()) -> None:
    if plan.empty:
        click.echo("No changes.")
    for number, op in enumerate(plan.operations, 1):
        flags = (
            " [destructive]" if op.destructive else (" [checked against data]" if op.risky else "")
        )
        click.echo(f"{number:>3}. {op.description}{flags}")
    for failure in failures:
        click.secho(f"  refused: {failure.message}", fg="red")
        if failure.sample_ids:
            click.echo(f"      e.g. records {', '.join(failure.sample_ids)}")


@meta.command("plan")
@click.option("--tenant", "slug", required=True)
@click.option("--purge", multiple=True, help="Archived 'entity' or 'entity.field' to drop.")
@click.argument("folder", type=click.Path(exists=True))
@click.pass_context
def meta_plan(ctx: click.Context, slug: str, purge: tuple[str, ...], folder: str) -> None:
    """Show what publishing a bundle folder would do."""
    store = _platform(ctx).store(_tenant(_platform(ctx), slug))
    doc = _load(folder)
    try:
        with store.connect() as connection:
            head, plan, failures = metastore.preview(connection, doc, purge)
    except BundleInvalid as exc:
        _print_problems(exc.problems)
        sys.exit(1)
    click.echo(f"Against version {head.version}:")
    _print_plan(plan, failures)
    sys.exit(1 if failures else 0)


@meta.command("publish")
@click.option("--tenant", "slug", required=True)
@click.option(
    "--expected-version", type=int, required=True, help="The version you planned against."
)
@click.option("--comment", default="")
@click.option("--confirm-destructive", is_flag=True)
@click.option("--purge", multiple=True, help="Archived 'entity' or 'entity.field' to drop.")
@click.argument("folder", type=click.Path(exists=True))
@click.pass_context
def meta_publish(
    ctx: click.Context,
    slug: str,
    expected_version: int,
    comment: str,
    confirm_destructive: bool,
    purge: tuple[str, ...],
    folder: str,
) -> None:
    """Publish a bundle folder as the tenant's next metadata version."""
    store = _platform(ctx).store(_tenant(_platform(ctx), slug))
    doc = _load(folder)
    _run_publish(
        lambda: metastore.publish(
            store,
            doc,
            expected_version=expected_version,
            actor=Actor(None, "cli"),
            comment=comment,
            confirm_destructive=confirm_destructive,
            purge=purge,
            lock_timeout_ms=_platform(ctx).settings.ddl_lock_timeout_ms,
        ),
        expected_version,
    )


def _run_publish(call: Any, expected_version: int) -> None:
    try:
        version = call()
    except BundleInvalid as exc:
        _print_problems(exc.problems)
        _fail("nothing was changed")
    except (metastore.VersionConflict, metastore.UnknownVersion, metastore.SchemaBusy) as exc:
        _fail(f"{exc}; nothing was changed")
    except metastore.ConfirmationRequired as exc:
        _print_plan(exc.plan)
        _fail("the plan drops data: repeat with --confirm-destructive; nothing was changed")
    except DataCheckFailed as exc:
        for failure in exc.failures:
            click.echo(f"  {failure.message}")
            if failure.sample_ids:
                click.echo(f"      e.g. records {', '.join(failure.sample_ids)}")
        _fail("the data does not allow this change; nothing was changed")
    if version.version == expected_version:
        click.echo(f"No changes: version {version.version} stays published.")
        return
    click.echo(f"Published version {version.version} ({len(version.operations)} operations).")


@meta.command("history")
@click.option("--tenant", "slug", required=True)
@click.pass_context
def meta_history(ctx: click.Context, slug: str) -> None:
    """List the published versions."""
    store = _platform(ctx).store(_tenant(_platform(ctx), slug))
    with store.connect() as connection:
        for version in metastore.history(connection):
            s = version.summary()
            click.echo(
                f"{s['version']:>4}  {s['created_at'][:19]}  {s['action']:<8} "
                f"{s['created_by'] or '-':<24} {s['operations']:>3} ops  {s['comment']}"
            )


@meta.command("diff")
@click.option("--tenant", "slug", required=True)
@click.argument("from_version", type=int)
@click.argument("to_version", type=int)
@click.pass_context
def meta_diff(ctx: click.Context, slug: str, from_version: int, to_version: int) -> None:
    """Show the operations between two versions."""
    store = _platform(ctx).store(_tenant(_platform(ctx), slug))
    try:
        with store.connect() as connection:
            plan = metastore.diff(connection, from_version, to_version)
    except metastore.UnknownVersion as exc:
        _fail(str(exc))
    _print_plan(plan)


@meta.command("rollback")
@click.option("--tenant", "slug", required=True)
@click.option("--to", "to_version", type=int, required=True)
@click.option("--expected-version", type=int, required=True)
@click.option("--comment", default="", help="Why (kept with the version).")
@click.option("--confirm-destructive", is_flag=True)
@click.pass_context
def meta_rollback(
    ctx: click.Context,
    slug: str,
    to_version: int,
    expected_version: int,
    comment: str,
    confirm_destructive: bool,
) -> None:
    """Publish an earlier version again, as a new version."""
    store = _platform(ctx).store(_tenant(_platform(ctx), slug))
    _run_publish(
        lambda: metastore.rollback(
            store,
            to_version,
            expected_version=expected_version,
            actor=Actor(None, "cli"),
            comment=comment,
            confirm_destructive=confirm_destructive,
            lock_timeout_ms=_platform(ctx).settings.ddl_lock_timeout_ms,
        ),
        expected_version,
    )


@meta.command("export")
@click.option("--tenant", "slug", required=True)
@click.option("--version", "number", type=int, default=None, help="Default: the latest.")
@click.argument("output", type=click.Path(dir_okay=False, writable=True))
@click.pass_context
def meta_export(ctx: click.Context, slug: str, number: int | None, output: str) -> None:
    """Write a published bundle to a JSON file."""
    store = _platform(ctx).store(_tenant(_platform(ctx), slug))
    try:
        with store.connect() as connection:
            version = (
                metastore.current(connection)
                if number is None
                else metastore.get(connection, number)
            )
    except metastore.UnknownVersion as exc:
        _fail(str(exc))
    try:
        Path(output).write_text(json.dumps(version.bundle, ensure_ascii=False, indent=2), "utf-8")
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror}")
    click.echo(f"Wrote version {version.version} to {output}.")


# -- audit ----------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """Verify and export a tenant's audit trail."""


def _anchors(values: tuple[str, ...]) -> dict[int, str]:
    anchors: dict[int, str] = {}
    for value in values:
        seq, colon, digest = value.partition(":")
        if (
            not colon
            or not seq.isdigit()
            or len(seq) > 18
            or len(digest) != 64
            or any(c not in "0123456789abcdef" for c in digest)
        ):
            _fail(f"--anchor must be SEQ:HASH as 'audit verify' prints them, not {value[:80]!r}")
        anchors[int(seq)] = digest
    return anchors


@audit.command("verify")
@click.option("--tenant", "slug", required=True)
@click.option(
    "--anchor",
    "anchors",
    multiple=True,
    metavar="SEQ:HASH",
    help="A head an earlier run printed; fails if that entry's hash changed. Repeatable.",
)
@click.pass_context
def audit_verify(ctx: click.Context, slug: str, anchors: tuple[str, ...]) -> None:
    """Check the audit trail's hash chain; name every changed, missing, reordered or
    inserted entry and exit 1 if there is one."""
    expected = _anchors(anchors)
    store = _platform(ctx).store(_tenant(_platform(ctx), slug))
    try:
        with store.connect() as connection:
            report = audittrail.verify(connection, expected)
    except sa.exc.SQLAlchemyError as exc:
        _fail(f"cannot read the audit trail of '{slug}': {type(exc.orig or exc).__name__}")
    for problem in report.problems:
        where = "head" if problem.seq is None else f"seq {problem.seq}"
        click.echo(f"TAMPERED [{problem.kind}] {where}: {problem.message}")
    if not report.ok:
        _fail(
            f"the audit trail of '{slug}' fails verification: {len(report.problems)} "
            f"problem(s) in {report.entries} entries"
        )
    click.echo(
        f"OK: {report.entries} entries, chain intact; head seq {report.head_seq} "
        f"hash {report.head_hash}"
    )
    click.echo(f"Anchor for later runs: --anchor {report.head_seq}:{report.head_hash}")


def _when(value: str | None, option: str) -> Any:
    if value is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        _fail(f"{option} must be an ISO 8601 date-time such as 2026-01-31T09:00:00Z")
    if moment.tzinfo is None:
        _fail(f"{option} must carry a time zone (Z or +08:00)")
    try:
        return moment.astimezone(dt.UTC)
    except OverflowError:
        _fail(f"{option} is out of range")


@audit.command("export")
@click.option("--tenant", "slug", required=True)
@click.option("--since", default=None, help="Only entries at or after this time (ISO 8601).")
@click.option("--until", default=None, help="Only entries before this time (ISO 8601).")
@click.option(
    "--format",
    "kind",
    type=click.Choice(["csv", "jsonl"]),
    default="csv",
    show_default=True,
    help="CSV, or one JSON object per line.",
)
@click.argument("output", type=click.Path(dir_okay=False, allow_dash=True))
@click.pass_context
def audit_export(
    ctx: click.Context, slug: str, since: str | None, until: str | None, kind: str, output: str
) -> None:
    """Write the audit trail, unmasked and with its hashes, to OUTPUT ('-' for stdout).

    The export is itself recorded in the trail (action audit.export)."""
    start, end = _when(since, "--since"), _when(until, "--until")
    if start is not None and end is not None and start >= end:
        _fail("--until must be later than --since")
    store = _platform(ctx).store(_tenant(_platform(ctx), slug))
    wanted = audit_api.Search(None, (), None, None, start, end)
    try:
        stream = sys.stdout if output == "-" else open(output, "w", encoding="utf-8", newline="")
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror}")
    with store.begin() as connection:
        entry = audittrail.append(
            connection,
            action="audit.export",
            actor_id=None,
            actor_name="operator (command line)",
            detail={"format": kind, "filters": wanted.describe()},
        )
    count = 0
    with store.connect() as connection:
        rows = (
            audit_api.view(row, lambda _entity: frozenset())
            for row in audit_api.entries(connection, wanted, entry["seq"] - 1)
        )
        try:
            if kind == "csv":
                for line in audit_api.csv_rows(rows):
                    stream.write(line)
                    count += 1
                count -= 1  # the header
            else:
                for item in rows:
                    stream.write(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n")
                    count += 1
        finally:
            if stream is not sys.stdout:
                stream.close()
    if output != "-":
        click.echo(f"Wrote {count} audit entries to {output}.")
