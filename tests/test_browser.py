"""The search page in real headless Chromium (Debian's `chromium`, driven by Playwright) against a
real server (uvicorn) on a real index."""

import os
import shutil
import socket
import threading
import time

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

CHROMIUM = os.environ.get("PRISM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("PRISM_SKIP_BROWSER_TESTS") == "1":
            pytest.skip("PRISM_SKIP_BROWSER_TESTS=1 and no chromium")
        pytest.fail("no chromium found: `make test` installs Debian's chromium (or set PRISM_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"],
        )
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(build_serving_home):
    import uvicorn

    from api.app import create_app

    settings = build_serving_home("browser-home")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(server + "/")
    yield pg
    context.close()
    assert not errors, errors


def _result_ids(page) -> list[str]:
    return page.locator("#results > li").evaluate_all("items => items.map(li => li.dataset.productId)")


def test_type_a_query_and_see_results(page):
    from playwright.sync_api import expect

    page.fill("#q", "red shoe")
    page.press("#q", "Enter")
    cards = page.locator("#results > li")
    expect(cards).to_have_count(24)
    expect(page.locator("#status")).to_contain_text("Results 1–24")
    first = cards.first
    expect(first.locator(".title")).not_to_be_empty()
    expect(first.locator(".price")).to_contain_text("EUR")
    expect(first.locator(".score")).to_contain_text("score")
    # The thumbnail loads after the card renders (and is lazy), so wait for it rather than sample
    # it once; a broken image never gets a natural width and fails here after the timeout.
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=first.locator("img").element_handle(), timeout=15_000
    )
    assert "q=red+shoe" in page.url  # shareable


def test_upload_an_image_and_see_its_product_first(page, small_catalog):
    from playwright.sync_api import expect

    page.set_input_files("#image-input", str(small_catalog.parent / "images" / "00042.png"))
    expect(page.locator("#results > li").first).to_have_attribute("data-product-id", "P00042")
    expect(page.locator("#status")).to_contain_text("your image → image")
    expect(page.locator("#query-image")).to_be_visible()


def test_drop_an_image_onto_the_page(page, small_catalog):
    from playwright.sync_api import expect

    data = list((small_catalog.parent / "images" / "00077.png").read_bytes())
    transfer = page.evaluate_handle(
        """bytes => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
            return dt;
        }""",
        data,
    )
    page.dispatch_event("body", "dragenter", {"dataTransfer": transfer})
    expect(page.locator("#drop-overlay")).to_be_visible()
    page.dispatch_event("body", "drop", {"dataTransfer": transfer})
    expect(page.locator("#results > li").first).to_have_attribute("data-product-id", "P00077")
    expect(page.locator("#drop-overlay")).to_be_hidden()


def test_target_switch_filters_paging_and_similar(page):
    from playwright.sync_api import expect

    page.fill("#q", "blue bag")
    page.press("#q", "Enter")
    expect(page.locator("#results > li")).to_have_count(24)
    first_page = _result_ids(page)

    page.click("#next")
    expect(page.locator("#status")).to_contain_text("Results 25–48")
    assert not set(_result_ids(page)) & set(first_page)
    page.click("#prev")
    expect(page.locator("#status")).to_contain_text("Results 1–24")
    assert _result_ids(page) == first_page

    page.check('input[name="target"][value="text"]')
    expect(page.locator("#status")).to_contain_text("→ text")

    expect(page.locator("#category option")).not_to_have_count(1)  # facets loaded
    page.select_option("#category", "hats")
    expect(page.locator("#status")).to_contain_text("Results 1–")
    expect(page.locator("#results > li")).to_have_count(24)
    categories = page.locator("#results > li").evaluate_all("items => items.map(li => li.dataset.category)")
    assert set(categories) == {"hats"}
    page.locator("#results > li .open").first.click()
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#detail-meta")).to_contain_text("hats")
    page.click("#detail-similar")
    expect(page.locator("#status")).to_contain_text("products like")
    expect(page.locator("#detail")).to_be_hidden()


def test_errors_are_shown_not_swallowed(page, bad_images, tmp_path):
    from playwright.sync_api import expect

    broken = tmp_path / "broken.png"
    broken.write_bytes(bad_images["truncated"])
    page.set_input_files("#image-input", str(broken))
    expect(page.locator("#status")).to_contain_text("Search failed: unusable image (broken)")
    expect(page.locator("#status")).to_have_class("error")
    expect(page.locator("#results > li")).to_have_count(0)


def test_the_page_reports_impressions_and_the_click_it_opens(page, server):
    import httpx
    from playwright.sync_api import expect

    with page.expect_response(lambda r: r.url.endswith("/v1/events")) as shown:
        page.fill("#q", "green shoe")
        page.press("#q", "Enter")
    assert shown.value.status == 200 and shown.value.json() == {"stored": 24, "duplicates": 0}
    impressions = shown.value.request.post_data_json
    assert [e["type"] for e in impressions] == ["impression"] * 24
    assert [e["position"] for e in impressions] == list(range(1, 25))
    assert impressions[2]["product_id"] == _result_ids(page)[2]

    with page.expect_response(lambda r: r.url.endswith("/v1/events")) as clicked:
        page.locator("#results > li .open").nth(2).click()
    expect(page.locator("#detail")).to_be_visible()
    assert clicked.value.status == 200 and clicked.value.json()["stored"] == 1
    (click,) = clicked.value.request.post_data_json
    assert click["type"] == "click" and click["position"] == 3 and click["product_id"] == _result_ids(page)[2]
    assert click["query_id"] == impressions[0]["query_id"]
    # the server checked it against the search log: the same click with a made-up position is refused
    bad = httpx.post(server + "/v1/events", json=[{**click, "event_id": "x-1", "position": 7}])
    assert bad.status_code == 422 and "served at position 3" in bad.json()["detail"]
