"""The API tokens page in a real browser: create a token, see its secret once, revoke it.

Headless chromium (Playwright) against the app on a local port, as in the
sign-in browser test; the secret read off the page is then used as a bearer
token against the same server, before and after the revocation.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest
from playwright.sync_api import Page, expect

from metacrm.runtime.platform import Platform

from .test_signin_browser import _sign_in, _tenant_with_member, page, server

__all__ = ["page", "server"]  # the fixtures of the sign-in browser tests

pytestmark = pytest.mark.browser


def _status(base: str, slug: str, secret: str) -> int:
    request = urllib.request.Request(
        f"{base}/t/{slug}/api/v1/records/customer",
        headers={"Authorization": f"Bearer {secret}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_create_token_see_it_once_and_revoke_it(
    platform: Platform, server: str, page: Page
) -> None:
    slug, email = _tenant_with_member(platform)
    page.set_viewport_size({"width": 360, "height": 740})
    _sign_in(page, server, email)
    expect(page).to_have_url(f"{server}/t/{slug}/")
    page.get_by_role("link", name="API tokens").click()
    expect(page).to_have_url(f"{server}/t/{slug}/account/tokens")
    expect(page.locator("#no-tokens")).to_be_visible()

    page.get_by_label("Name").fill("laptop script")
    page.get_by_label("Expires after").fill("7")
    page.get_by_role("button", name="Create token").click()
    expect(page.locator("#token-notice")).to_contain_text("laptop script")
    secret = page.locator("#token-secret").inner_text().strip()
    assert re.fullmatch(r"mcrm_[0-9a-f]{32}_[A-Za-z0-9_-]+", secret)
    assert _status(server, slug, secret) == 200
    # The page fits a phone: no sideways scrolling, even with the long secret.
    assert page.evaluate("document.documentElement.scrollWidth") <= 360

    page.goto(f"{server}/t/{slug}/account/tokens")
    expect(page.locator("#token-secret")).to_have_count(0)
    assert secret not in page.content()
    token = page.locator("li.token")
    expect(token).to_have_count(1)
    expect(token).to_contain_text("laptop script")
    expect(token.locator(".state")).to_have_text("active")

    token.get_by_role("button", name="Revoke").click()
    expect(page.locator("#token-notice")).to_contain_text("revoked")
    expect(page.locator("li.token .state")).to_contain_text("revoked")
    expect(page.locator("li.token").get_by_role("button", name="Revoke")).to_have_count(0)
    assert _status(server, slug, secret) == 401
