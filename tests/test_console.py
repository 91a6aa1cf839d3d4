"""The console at /console, in a real headless browser: Debian's chromium driven by Playwright (which
cannot download a browser of its own here), against the session's live stack.

``CONSOLE_SCREENSHOT=docs/console.png`` makes the main test save the README's screenshot.
"""

from __future__ import annotations

import os
import re
import uuid

import aiohttp
import openai
import pytest
from playwright.async_api import Page, async_playwright, expect

from bus.subjects import LANES, usage_subject
from tests.conftest import ADMIN_TOKEN, CHAT_MODEL, admin, eventually, leave_a_stream, usage_rows

CHROMIUM = "/usr/bin/chromium"
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
async def browser():
    expect.set_options(timeout=15_000)  # the live panels are re-read every 5 s
    async with async_playwright() as pw:
        # As root in a container: no sandbox.
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        yield chromium
        await chromium.close()


@pytest.fixture
async def page(browser, stack, meter) -> Page:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    tab = await context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    # A refused sign-in logs its 401 as a console error; a CSP refusal must not happen at all.
    tab.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    tab.on("dialog", lambda dialog: dialog.accept())  # "Revoke key …?"
    await tab.goto(stack.base_url + "/console")
    yield tab
    await context.close()
    assert not errors, errors


async def _sign_in(page: Page, token: str = ADMIN_TOKEN) -> None:
    await page.fill("#token", token)
    await page.click("#login button[type=submit]")


def _n(value: int) -> str:
    return f"{value:,}"  # as the page writes numbers (en-US)


async def test_files_are_served_with_their_types_under_a_strict_csp_and_data_needs_the_token(stack):
    async with aiohttp.ClientSession() as http:
        for path, kind in (("/console", "text/html"), ("/console/console.js", "text/javascript"),
                           ("/console/console.css", "text/css")):
            async with http.get(stack.base_url + path) as resp:
                assert resp.status == 200 and resp.content_type == kind, path
                assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
                assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
                body = await resp.text()
                assert not re.search(r"""(src|href|url)[=(]["']?(https?:)?//""", body), path  # nothing from outside
        for path in ("/console/app.py", "/console/..%2Fconsole_routes.py"):
            async with http.get(stack.base_url + path) as resp:
                assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_url"
    for path in ("/admin/queues", "/admin/workers", "/admin/dead-letters"):
        status, body = await admin(stack, "GET", path, token="wrong")
        assert status == 401 and body["error"]["type"] == "invalid_request_error", path


async def test_the_console_runs_a_tenant_and_shows_what_the_admin_api_says(stack, page):
    await _sign_in(page, "not-the-token")
    await expect(page.locator("#login-error")).to_contain_text("Incorrect admin token")
    await expect(page.locator("#app")).to_be_hidden()
    await _sign_in(page)
    await expect(page.locator("#app")).to_be_visible()

    # A tenant and a key made in the page; the key is shown once.
    tenant = "console-" + uuid.uuid4().hex[:8]
    await page.fill("#tenant-id", tenant)
    await page.fill("#tenant-tier", "pro")
    await page.click("#tenant-form button[type=submit]")
    await expect(page.locator(f"#tenant-table tr[data-tenant='{tenant}']")).to_be_visible()
    await expect(page.locator("#tenant-select")).to_have_value(tenant)
    await page.fill("#key-name", "from-the-console")
    await page.click("#key-form button[type=submit]")
    await expect(page.locator("#new-key-secret")).to_have_text(re.compile(r"^\S{20,}$"))
    secret = await page.locator("#new-key-secret").text_content()

    # Credits and a budget, set in the page, read back by the API.
    await page.fill("#credit-amount", "5000")
    await page.click("#credit-form button[type=submit]")
    await page.fill("#budget-name", "monthly-cap")
    await page.fill("#budget-amount", "900000")
    await page.click("#budget-form button[type=submit]")
    await expect(page.locator(f"#budget-table tr[data-budget='{tenant}.monthly-cap'] td.amount")).to_have_text("900,000")

    # Real requests with that key; the page's numbers are the admin usage API's.
    client = stack.client(api_key=secret)
    for _ in range(2):
        await client.chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=3)

    async def billed():
        status, body = await admin(stack, "GET", f"/admin/usage?tenant={tenant}&group_by=tenant,model")
        return status == 200 and body["data"] and body["data"][0]["requests"] == 2 and body["data"][0]

    usage = await eventually(billed, timeout=20)

    async def credited():
        _, body = await admin(stack, "GET", f"/admin/tenants/{tenant}/credits")
        return body["available_micros"] == 5000

    await eventually(credited)
    await page.click("#refresh")
    row = page.locator(f"#usage-table tr[data-tenant='{tenant}'][data-model='{CHAT_MODEL}']")
    for cell, field in (("requests", "requests"), ("input", "input_units"), ("output", "output_units"),
                        ("cost", "cost_micros")):
        await expect(row.locator("td." + cell)).to_have_text(_n(usage[field]))
    assert usage["cost_micros"] > 0
    await expect(page.locator("#credits")).to_have_text("5,000")
    await expect(page.locator("#chart svg rect").first).to_be_visible()  # the chart drew this hour's bar

    # The bus panels: the chat model's lanes, and its live worker.
    for lane in LANES:
        await expect(page.locator(f"#queue-table tr[data-model='{CHAT_MODEL}'][data-lane='{lane}'] td.queued")
                     ).to_have_text(re.compile(r"^\d"))
    _, workers = await admin(stack, "GET", "/admin/workers")
    live = [w for w in workers["data"] if w["model"] == CHAT_MODEL]
    assert live, workers
    await expect(page.locator(f"#worker-table tr[data-model='{CHAT_MODEL}'] td.live")).to_have_text(_n(len(live)))
    if path := os.environ.get("CONSOLE_SCREENSHOT"):
        await page.screenshot(path=path)

    # Revoking the key in the page: the API refuses it from then on.
    await page.click("#key-table tr:has-text('from-the-console') button")
    await expect(page.locator("#key-table td.state")).to_have_text("revoked")

    async def refused():
        try:
            await client.chat.completions.create(model=CHAT_MODEL, messages=HI, max_tokens=1)
        except openai.AuthenticationError as exc:
            return exc.status_code == 401
        return False

    assert await eventually(refused, timeout=5)


async def test_failures_show_requests_that_did_not_finish_and_dead_letters(stack, nc, client, clickhouse, page):
    # A request its client left: billed as cancelled, counted with the model's failures.
    [row] = await usage_rows(clickhouse, [await leave_a_stream(client)], expect=1)
    assert row["status"] == "cancelled"
    # A message billing cannot take: unsigned, it is moved to the dead letters.
    subject = usage_subject("console-poison-" + uuid.uuid4().hex[:6])
    await nc.jetstream().publish(subject, b"not a usage report")

    async def dead():
        status, body = await admin(stack, "GET", "/admin/dead-letters")
        assert status == 200, body
        return [d for d in body["data"] if d["subject"] == subject]

    [letter] = await eventually(dead)
    assert letter["source"] == "usage" and letter["reason"]
    _, usage = await admin(stack, "GET", "/admin/usage?group_by=model,status")
    [cancelled] = [r for r in usage["data"] if r["group"] == {"model": CHAT_MODEL, "status": "cancelled"}]

    await _sign_in(page)
    failed = page.locator(f"#failed-table tr[data-model='{CHAT_MODEL}'][data-status='cancelled'] td.requests")
    await expect(failed).to_have_text(_n(cancelled["requests"]))
    row = page.locator(f"#dead-table tr[data-seq='{letter['seq']}']")
    await expect(row.locator("td.subject")).to_have_text(subject)
    await expect(row.locator("td.reason")).to_have_text(letter["reason"])
