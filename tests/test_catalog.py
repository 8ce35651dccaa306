import json

import pytest

from indexer import CatalogError, CatalogRow, ImagePolicy, RowError, read_catalog

# Touches no database: the suite's SQLite run covers it, its PostgreSQL run skips it.
pytestmark = pytest.mark.no_database


def _split(items):
    rows = [i for i in items if isinstance(i, CatalogRow)]
    errors = [i for i in items if isinstance(i, RowError)]
    return rows, errors


def _write_csv(path, text):
    path.write_text(text)
    return path


def test_csv_good_and_bad_rows_are_separated(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"x")
    path = _write_csv(
        tmp_path / "c.csv",
        "product_id,title,price,currency,image,color\n"
        "A1,Red apple,1.20,eur,img/a.png,red\n"  # good, extra column -> attributes
        ",No id,1,EUR,,\n"  # missing id
        "A2,,1,EUR,,\n"  # empty title
        "A3,Bad price,abc,EUR,,\n"
        "A4,Negative,-3,EUR,,\n"
        "A5,Bad currency,3,EURO,,\n"
        "A1,Duplicate,3,EUR,,\n"
        "A6,Escape,3,EUR,../../etc/passwd,\n",
    )
    rows, errors = _split(list(read_catalog(path)))
    assert [r.product.product_id for r in rows] == ["A1", "A6"]
    a1 = rows[0].product
    assert a1.currency == "EUR" and a1.price == pytest.approx(1.2)
    assert a1.image_uri == str((tmp_path / "img" / "a.png").resolve())
    assert a1.attributes == {"color": "red"}
    # the escaping image is refused but the product stays (text-only), with the reason recorded
    assert rows[1].product.image_uri is None and "escapes" in rows[1].product.attributes["_image_rejected"]
    reasons = {e.line: e.reason for e in errors}
    assert reasons[3] == "product_id is missing"
    assert reasons[4] == "title is missing"
    assert "not a number" in reasons[5]
    assert ">= 0" in reasons[6]
    assert "3-letter" in reasons[7]
    assert "duplicate product_id (first seen at line 2)" == reasons[8]


def test_missing_required_column_is_a_catalog_error(tmp_path):
    path = _write_csv(tmp_path / "c.csv", "id,title\n1,x\n")
    with pytest.raises(CatalogError, match="missing required column"):
        list(read_catalog(path))


def test_unsupported_format_and_missing_file(tmp_path):
    (tmp_path / "c.xlsx").write_text("x")
    with pytest.raises(CatalogError, match="unsupported"):
        list(read_catalog(tmp_path / "c.xlsx"))
    with pytest.raises(CatalogError, match="not found"):
        list(read_catalog(tmp_path / "nope.csv"))


def test_jsonl_reports_invalid_lines_and_wrong_types(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"product_id": "J1", "title": "ok", "attributes": {"size": "M"}, "price": 3}) + "\n"
        "{not json\n"
        "[1, 2]\n"
        + json.dumps({"product_id": "J2", "title": "bad attrs", "attributes": [1]}) + "\n"
        + json.dumps({"product_id": "J3", "title": {"nested": 1}}) + "\n"
        + json.dumps({"product_id": 7, "title": "int id"}) + "\n"
    )
    rows, errors = _split(list(read_catalog(path)))
    assert [r.product.product_id for r in rows] == ["J1", "7"]
    assert rows[0].product.attributes == {"size": "M"}
    assert {e.line for e in errors} == {2, 3, 4, 5}
    assert any("invalid JSON" in e.reason for e in errors)
    assert any("JSON object" in e.reason for e in errors)


def test_parquet_reader(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"product_id": ["P1", "P2", None], "title": ["one", "two", "three"], "price": [1.0, None, 2.0]}),
        tmp_path / "c.parquet",
    )
    rows, errors = _split(list(read_catalog(tmp_path / "c.parquet")))
    assert [r.product.product_id for r in rows] == ["P1", "P2"]
    assert rows[1].product.price is None
    assert errors[0].line == 3 and "product_id" in errors[0].reason


def test_url_images_need_the_flag_and_image_root_confines_absolute_paths(tmp_path):
    path = _write_csv(tmp_path / "c.csv", "product_id,title,image\nU1,url,https://example.com/a.png\nU2,abs,/etc/hosts\n")
    rows, _ = _split(list(read_catalog(path)))
    assert "disabled" in rows[0].product.attributes["_image_rejected"]
    assert rows[1].product.image_uri == "/etc/hosts"  # absolute paths are the catalog author's call...
    rows, _ = _split(list(read_catalog(path, ImagePolicy(root=tmp_path, allow_urls=True))))
    assert rows[0].product.image_uri == "https://example.com/a.png"
    assert "escapes" in rows[1].product.attributes["_image_rejected"]  # ...unless an image root is set


def test_url_fetch_refuses_a_live_loopback_server_and_odd_schemes():
    import http.server
    import threading

    from indexer import FetchError, fetch_image_url

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(FetchError) as exc:
            fetch_image_url(f"http://127.0.0.1:{server.server_port}/", max_bytes=1000, timeout_s=5)
        assert exc.value.reason == "forbidden_address"
    finally:
        server.shutdown()
    with pytest.raises(FetchError, match="http"):
        fetch_image_url("file:///etc/passwd", max_bytes=1000, timeout_s=2)


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
    "http://10.1.2.3/a.png", "http://192.168.0.1/a.png", "http://100.64.0.1/a.png",  # private, carrier-grade NAT
    "http://localhost:8000/", "http://[::1]/", "http://[::ffff:127.0.0.1]/",  # loopback, also IPv4-mapped
    "http://0.0.0.0/", "http://2130706433/",  # 'this host', 127.0.0.1 written as one number
])
def test_url_fetch_never_connects_to_internal_addresses(url):
    from indexer import FetchError, fetch_image_url

    with pytest.raises(FetchError) as exc:
        fetch_image_url(url, max_bytes=1000, timeout_s=2)
    assert exc.value.reason == "forbidden_address" and "no public address" in str(exc.value)


def test_url_fetch_is_bounded_in_bytes_and_in_total_time():
    import time

    from indexer import FetchError
    from indexer.fetch import _read_bounded

    class Trickle:  # a server sending one byte every 50 ms: each read is quick, the whole is not
        def read1(self, n):
            time.sleep(0.05)
            return b"x"

    started = time.monotonic()
    with pytest.raises(FetchError) as exc:
        _read_bounded(Trickle(), "http://slow.example/", max_bytes=10_000, deadline=started + 0.3)
    assert exc.value.reason == "timeout" and time.monotonic() - started < 1.0

    class Flood:
        def read1(self, n):
            return b"y" * n

    assert len(_read_bounded(Flood(), "http://big.example/", max_bytes=1000, deadline=time.monotonic() + 5)) == 1001


def test_an_oversized_csv_cell_is_a_bad_row_not_a_failed_catalog(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("product_id,title,description\nA,ok,short\nB,big," + "x" * 300_000 + "\nC,fine,\n")
    rows, errors = _split(list(read_catalog(path)))
    assert [r.product.product_id for r in rows] == ["A", "C"]
    assert [(e.line, e.product_id) for e in errors] == [(3, "B")] and "300000 characters" in errors[0].reason


@pytest.mark.parametrize("address", [
    "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1",  # NAT64 to 169.254.169.254, 10.0.0.1
    "2002:a00:1::1", "::a00:1", "::ffff:0:a00:1", "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # 6to4, compatible, Teredo
])
def test_ipv6_addresses_that_carry_an_internal_ipv4_one_are_not_public(address):
    from indexer.fetch import _is_public

    assert not _is_public(address)
    assert _is_public("2606:4700:4700::1111") and _is_public("64:ff9b::808:808")  # public, and NAT64 to 8.8.8.8


@pytest.fixture
def loopback_counts_as_public(monkeypatch):
    """Only 127.0.0.1 passes the public-address check, so a local server can play a slow or
    redirecting public one; 127.0.0.2 (also loopback) stays internal."""
    import indexer.fetch as fetch

    real = fetch._is_public
    monkeypatch.setattr(fetch, "_is_public", lambda address: address == "127.0.0.1" or real(address))


def _serve(handler_cls):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_url_fetch_has_one_time_limit_for_headers_and_body(loopback_counts_as_public):
    import http.server
    import time

    from indexer import FetchError, fetch_image_url

    class SlowHeaders(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # every read arrives well within a socket timeout; the whole never does
            for byte in b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"x" * 100:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)

        def log_message(self, *args):
            pass

    server = _serve(SlowHeaders)
    try:
        started = time.monotonic()
        with pytest.raises(FetchError) as exc:
            fetch_image_url(f"http://127.0.0.1:{server.server_port}/a.png", max_bytes=10_000, timeout_s=1.0)
        assert exc.value.reason == "timeout" and time.monotonic() - started < 3.0
    finally:
        server.shutdown()


def test_a_redirect_to_an_internal_address_is_refused(loopback_counts_as_public):
    import http.server

    from indexer import FetchError, fetch_image_url

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.2:9/secret.png")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = _serve(Redirect)
    try:
        with pytest.raises(FetchError) as exc:
            fetch_image_url(f"http://127.0.0.1:{server.server_port}/a.png", max_bytes=10_000, timeout_s=5)
        assert exc.value.reason == "forbidden_address" and "127.0.0.2" in str(exc.value)
    finally:
        server.shutdown()
