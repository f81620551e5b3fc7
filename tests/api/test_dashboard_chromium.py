"""The dashboard in headless Chromium: sign in, the study list, a study page with its overlays.

Screenshots land in ``test-artifacts/`` at the repository root. Playwright never
downloads a browser here: it drives the Debian ``/usr/bin/chromium``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support import REPO

from .readside import VIEWER_TOKEN, Node, serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")


def test_study_list_and_study_page_in_chromium(sqlite_node: Node) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    f = sqlite_node.filled
    with serving(sqlite_node) as api, sync_playwright() as playwright:
        base = str(api.base_url)
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(base) else outside.append(r.url))

            page.goto(f"{base}/studies")
            expect(page.locator("h1")).to_have_text("Sign in")
            page.fill("#token", VIEWER_TOKEN)
            page.click("button[type=submit]")

            rows = page.locator("#studies tbody tr")
            expect(rows).to_have_count(f.study_count)
            expect(rows.nth(1)).to_contain_text("advanced gastric cancer")
            expect(rows.nth(1)).to_contain_text("delivery dead")
            page.screenshot(path=str(ARTIFACTS / "dashboard-studies.png"), full_page=True)

            page.locator(f'a[href="/studies/{f.complete}"]').first.click()
            expect(page.locator("#conclusion")).to_contain_text("early gastric cancer / HGIN")
            cards = page.locator("#images article")
            expect(cards).to_have_count(4)
            expect(cards.nth(2)).to_contain_text("peptic ulcer")
            expect(cards.nth(2)).to_contain_text("76.0%")
            images = page.locator("#images img")
            expect(images).to_have_count(4)
            for n in range(4):  # every thumbnail decoded (naturalWidth is 0 for a broken image)
                images.nth(n).scroll_into_view_if_needed()
                page.wait_for_function(
                    "img => img.complete && img.naturalWidth > 0", arg=images.nth(n).element_handle()
                )
            expect(page.locator("#outputs tbody tr")).to_have_count(13)
            page.screenshot(path=str(ARTIFACTS / "dashboard-study.png"), full_page=True)

            page.goto(f"{base}/queue")
            expect(page.locator("#deliveries tbody tr")).to_have_count(1)
            page.screenshot(path=str(ARTIFACTS / "dashboard-queue.png"), full_page=True)
            assert outside == []
        finally:
            browser.close()
    assert (ARTIFACTS / "dashboard-study.png").stat().st_size > 20_000
