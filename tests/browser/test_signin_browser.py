"""Sign-in in a real browser: headless chromium (Playwright) against the app on a local port.

The app runs in a werkzeug server thread, on the same databases as the test's
platform; the browser signs in, turns on two-step sign-in by reading the key
under the QR code, signs out and signs in again with a TOTP code, as a person
with an authenticator app would. These tests run in CI and are never skipped.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from werkzeug.serving import make_server

from metacrm.runtime import mfa, tenancy
from metacrm.runtime.control import User
from metacrm.runtime.platform import Platform

from ..integration.runtime.test_api_meta import CHEAP_HASHER, build_app

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "a long browser passphrase 7"


@pytest.fixture
def server(platform: Platform) -> Iterator[str]:
    """Serve the application on a free local port for the test's duration."""
    with build_app(platform.settings) as app:
        http = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=http.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{http.server_port}"
        finally:
            http.shutdown()
            thread.join(timeout=10)
            http.server_close()


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            context = browser.new_context(locale="en-US")
            yield context.new_page()
            context.close()
        finally:
            browser.close()


def _tenant_with_member(platform: Platform) -> tuple[str, str]:
    slug = f"b{uuid.uuid4().hex[:10]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tenancy, "hash_password", CHEAP_HASHER.hash)
        tenancy.create_tenant(platform, slug, "Browser Co", admin_email=f"admin@{slug}.example")
    email = f"rep@{slug}.example"
    with platform.session() as session:
        from metacrm.runtime.control import Membership

        tenant = platform.tenant(session, slug)
        assert tenant is not None
        user = User(email=email, display_name="Rita Rep", password_hash=CHEAP_HASHER.hash(PASSWORD))
        session.add(user)
        session.flush()
        session.add(Membership(tenant_id=tenant.id, user_id=user.id, roles=["sales_rep"]))
    return slug, email


def _sign_in(page: Page, base: str, email: str) -> None:
    page.goto(f"{base}/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()


def test_sign_in_enrol_mfa_sign_out_and_back_with_totp(
    platform: Platform, server: str, page: Page
) -> None:
    slug, email = _tenant_with_member(platform)
    _sign_in(page, server, email)
    expect(page).to_have_url(f"{server}/t/{slug}/")
    expect(page.locator("#user-email")).to_have_text(email)
    expect(page.locator("#tenant-name")).to_contain_text("Browser Co")

    page.get_by_role("link", name="Sign-in security").click()
    page.get_by_role("button", name="Set up two-step sign-in").click()
    expect(page.locator(".qr svg")).to_be_visible()
    secret = page.locator("#mfa-key").inner_text().strip()
    page.get_by_label("Code").fill(mfa.current_code(secret))
    page.get_by_role("button", name="Turn on").click()
    expect(page.locator("#recovery-codes li")).to_have_count(mfa.RECOVERY_CODES)
    page.get_by_role("link", name="Done").click()
    expect(page).to_have_url(f"{server}/t/{slug}/")

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{server}/login")
    page.goto(f"{server}/t/{slug}/")
    expect(page).to_have_url(f"{server}/login")

    _sign_in(page, server, email)
    expect(page).to_have_url(f"{server}/login/mfa")
    # The code of the next 30-second step: the enrolment spent this step's code.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=mfa.STEP_SECONDS)
    page.get_by_label("Code").fill(mfa.current_code(secret, later))
    page.get_by_role("button", name="Verify").click()
    expect(page).to_have_url(f"{server}/t/{slug}/")
    expect(page.locator("#user-email")).to_have_text(email)


def test_sign_in_page_in_chinese_and_on_a_phone(
    platform: Platform, server: str, page: Page
) -> None:
    slug, email = _tenant_with_member(platform)
    page.set_viewport_size({"width": 360, "height": 740})
    page.goto(f"{server}/login?lang=zh-CN")
    expect(page.get_by_role("heading", name="登录")).to_be_visible()
    page.get_by_label("邮箱").fill(email)
    page.get_by_label("密码").fill("wrong password here")
    page.get_by_role("button", name="登录").click()
    expect(page.get_by_role("alert")).to_contain_text("邮箱或密码错误")
    # The form fits the phone's width: no sideways scrolling.
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360
