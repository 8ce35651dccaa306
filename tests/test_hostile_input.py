"""Hostile input, by hand: odd images, odd text, wrong types and hostile catalogs.

tests/test_api.py already refuses truncated, zip, bomb, strip and text uploads and a table of bad
requests; this file covers what it does not. The rule everywhere: bad input ends in a 4xx with a
JSON `detail` naming the problem (HTTP), or a clear message and a non-zero exit or a reported row
error (CLI): never a 500 or a traceback, and nothing stored before is lost. Odd but valid images
(animated, CMYK, 16-bit, EXIF-rotated, palette with transparency, 1x1) are searched the way a
product photo would be shown.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from api.app import create_app
from prism_cli import run_prism
from sample_catalog import draw_product_image
from waiting import eventually

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

TOKEN = "hostile-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TINY = "prism-tiny-vit:random"
ANCHOR = "P00017"  # indexed before any hostile input; must stay searchable by its image


@pytest.fixture(scope="module")
def settings(build_serving_home):
    return build_serving_home("hostile-home", admin_token=TOKEN)


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings), headers=ADMIN) as c:
        yield c


@pytest.fixture(scope="module")
def images(small_catalog):
    return small_catalog.parent / "images"


@pytest.fixture(scope="module", autouse=True)
def anchor(client, images):
    """What the anchor product looks like before anything hostile is sent."""
    return {"product": client.get(f"/v1/products/{ANCHOR}").json(), "image": (images / "00017.png").read_bytes(),
            "products": client.get("/v1/facets").json()["products"]}


# ---------------------------------------------------------------- helpers


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _upload(client, data: bytes, *, filename="q.png", content_type="image/png", **form):
    return client.post("/v1/search/image", files={"file": (filename, data, content_type)}, data={"k": "5", **form})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _hits(response) -> list[tuple[str, float]]:
    assert response.status_code == 200, response.text
    return [(h["product_id"], round(h["score"], 5)) for h in response.json()["results"]]


def _refused(response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail, response.text
    for word in words:
        assert word in detail, (word, detail)
    return detail


def _multipart(*parts: tuple[bytes, bytes, bytes | None]) -> tuple[bytes, dict]:
    """A raw multipart body from (Content-Disposition params, value, content type) parts: lets a
    test put bytes that are not UTF-8 where an HTTP client library would refuse to."""
    boundary = b"hostileboundary"
    body = b""
    for disposition, value, content_type in parts:
        body += b"--" + boundary + b"\r\nContent-Disposition: form-data; " + disposition + b"\r\n"
        if content_type:
            body += b"Content-Type: " + content_type + b"\r\n"
        body += b"\r\n" + value + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return body, {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}


def _assert_anchor_intact(client, anchor) -> None:
    assert client.get(f"/v1/products/{ANCHOR}").json() == anchor["product"]
    hits = _hits(_upload(client, anchor["image"], k="1"))
    assert hits[0][0] == ANCHOR and hits[0][1] == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------- odd images that are still photos


def _two_frames(images) -> list[Image.Image]:
    first = Image.open(images / "00017.png").convert("RGB")
    second = Image.open(images / "00040.png").convert("RGB")
    return [first, second]


ANIMATED = {
    "gif": lambda frames: (_encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
                           _encode(frames[0], "GIF")),
    "webp": lambda frames: (_encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100,
                                    lossless=True), _encode(frames[0], "WEBP", lossless=True)),
    "apng": lambda frames: (_encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100),
                            _encode(frames[0], "PNG")),
}


@pytest.mark.parametrize("fmt", sorted(ANIMATED))
def test_animated_images_are_searched_by_their_first_frame(client, images, fmt):
    """Animated GIF, WebP and APNG: the first frame stands for the product (what a listing shows
    before it plays). The answer equals that of the first frame alone, never the second's."""
    frames = _two_frames(images)
    animated, first_alone = ANIMATED[fmt](frames)
    with Image.open(io.BytesIO(animated)) as probe:
        assert getattr(probe, "n_frames", 1) == 2  # really animated
    hits = _hits(_upload(client, animated, filename=f"q.{fmt}", content_type=f"image/{fmt}"))
    assert hits == _hits(_upload(client, first_alone, filename=f"q.{fmt}"))
    assert hits[0][0] == ANCHOR  # not P00040, the second frame
    if fmt != "gif":  # lossless: the first frame is the catalog image itself
        assert hits[0][1] == pytest.approx(1.0, abs=1e-4)
    as_json = client.post("/v1/search", json={"image_b64": _b64(animated), "k": 5})
    assert _hits(as_json) == hits


def test_cmyk_jpeg_is_converted_to_rgb(client, images):
    """A CMYK JPEG (print workflows export them) is read in RGB with its colours right: its nearest
    product is the one it was made from, as for the RGB JPEG of the same picture."""
    picture = Image.open(images / "00017.png").convert("RGB")
    cmyk = _encode(picture.convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(cmyk)) as probe:
        assert probe.mode == "CMYK"
    hits = _hits(_upload(client, cmyk, filename="q.jpg", content_type="image/jpeg"))
    rgb = _hits(_upload(client, _encode(picture, "JPEG", quality=95), filename="q.jpg", content_type="image/jpeg"))
    assert hits[0][0] == rgb[0][0] == ANCHOR
    assert hits[0][1] > 0.98


def test_16_bit_greyscale_png_maps_the_full_range_to_8_bits(client, images):
    """A 16-bit greyscale PNG (mode I;16) reads as the same picture saved with 8 bits: 65535 is
    white. (Scaling by the brightest pixel instead brightened dark photos: a different query.)"""
    grey = np.asarray(Image.open(images / "00017.png").convert("L"), dtype=np.uint16) // 3  # a dark picture
    sixteen = _encode(Image.fromarray(grey * 257), "PNG")
    with Image.open(io.BytesIO(sixteen)) as probe:
        assert probe.mode.startswith("I;16")
    eight = _encode(Image.fromarray(grey.astype(np.uint8)), "PNG")
    assert _hits(_upload(client, sixteen)) == _hits(_upload(client, eight))


def test_exif_orientation_is_applied(client, images):
    """A JPEG whose EXIF says "rotate 90 degrees clockwise to display" (orientation 6, as phones
    write) is searched upright: exactly as its pixels rotated by hand, not as stored. The same
    holds when it becomes a product image through PUT."""
    stored = Image.open(images / "00023.png").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(jpeg)) as decoded:
        as_stored = decoded.convert("RGB")  # Pillow does not rotate by itself
    upright = _encode(as_stored.transpose(Image.Transpose.ROTATE_270), "PNG")  # 90 degrees clockwise
    hits = _hits(_upload(client, jpeg, filename="q.jpg", content_type="image/jpeg"))
    assert hits == _hits(_upload(client, upright))
    assert hits != _hits(_upload(client, _encode(as_stored, "PNG")))

    r = client.put("/v1/products/EXIF-1", json={"title": "rotated phone shot", "image_b64": _b64(jpeg)})
    assert r.status_code == 201, r.text
    top = _hits(_upload(client, upright, k="1"))
    assert top[0][0] == "EXIF-1" and top[0][1] == pytest.approx(1.0, abs=1e-4)


def _palette_image(alpha) -> tuple[bytes, bytes]:
    """A palette PNG (index 0 red and transparent, 1 blue, 2 half-transparent green) and the RGB
    picture it shows on white."""
    img = Image.new("P", (64, 64), 0)
    img.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 9))
    draw = ImageDraw.Draw(img)
    draw.rectangle([16, 16, 47, 47], fill=1)
    draw.ellipse([24, 4, 40, 20], fill=2)
    png = _encode(img, "PNG", transparency=alpha)
    img.info["transparency"] = alpha
    rgba = img.convert("RGBA")
    on_white = Image.new("RGB", img.size, (255, 255, 255))
    on_white.paste(rgba, mask=rgba.getchannel("A"))
    return png, _encode(on_white, "PNG")


@pytest.mark.parametrize("alpha", [0, bytes([0, 255, 128])], ids=["tRNS-index", "tRNS-per-entry"])
def test_palette_png_with_transparency_is_shown_on_white(client, alpha):
    """Palette PNGs with a transparent index or per-entry alpha are composited on white, like
    RGBA ones (not on the transparent entry's colour, here red)."""
    png, on_white = _palette_image(alpha)
    with Image.open(io.BytesIO(png)) as probe:
        assert probe.mode == "P" and "transparency" in probe.info
    assert _hits(_upload(client, png)) == _hits(_upload(client, on_white))


def test_one_pixel_image_is_a_valid_query_and_product(client):
    """1x1 is tiny but an image: searched (scaled up) and storable."""
    pixel = _encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG")
    assert len(_hits(_upload(client, pixel))) == 5
    r = client.put("/v1/products/PIXEL-1", json={"title": "one pixel", "image_b64": _b64(pixel)})
    assert r.status_code == 201 and r.json()["image_status"] == "ok", r.text


def test_declared_type_and_file_name_are_not_trusted(client, images, anchor):
    """The bytes decide: PNG bytes declared text/plain are an image, text declared image/png is
    not. The file name is never used (not as a path either), so odd names, even ones that are
    not UTF-8, do not matter."""
    data = anchor["image"]
    expected = _hits(_upload(client, data))
    assert _hits(_upload(client, data, filename="notes.txt", content_type="text/plain")) == expected
    assert _hits(_upload(client, data, filename="../../../etc/passwd", content_type="application/octet-stream")) == expected
    body, headers = _multipart((b'name="file"; filename="caf\xe9 \xff\xfe.png"', data, b"image/png"),
                               (b'name="k"', b"5", None))
    assert _hits(client.post("/v1/search/image", content=body, headers=headers)) == expected
    _refused(_upload(client, b"<html><body>hello</body></html>", content_type="image/png"), 415, "not a recognised image")


# ---------------------------------------------------------------- images that must be refused


def _png_with_bad_crc(images) -> bytes:
    data = bytearray((images / "00005.png").read_bytes())
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64" fill="red"/></svg>'
REFUSED_IMAGES = {
    # name: (bytes or a function of the catalog images, status, words in the detail)
    "zero-bytes": (b"", 422, ["0 bytes"]),
    "svg": (SVG, 415, ["SVG", "not supported"]),
    "svg-with-xml-prolog": (b'<?xml version="1.0" encoding="UTF-8"?>\n<!-- x -->\n' + SVG, 415, ["SVG"]),
    "pdf": (b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", 415, ["not a recognised image", "PNG, JPEG"]),
    "png-bad-crc": (_png_with_bad_crc, 422, ["damaged PNG"]),
    "jpeg-header-only": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00", 422, ["damaged JPEG"]),
}


@pytest.mark.parametrize("name", sorted(REFUSED_IMAGES))
def test_unusable_images_are_refused_on_every_route(client, images, anchor, name):
    """Zero bytes, SVG (a vector format: rasterising it would run a renderer on untrusted XML),
    PDF, a PNG whose header checksum is wrong and a JPEG with no image data: refused on upload,
    as base64 JSON and as a product image, with nothing stored."""
    data, status, words = REFUSED_IMAGES[name]
    data = data(images) if callable(data) else data
    _refused(_upload(client, data), status, *words)
    b64 = _b64(data)
    if data:  # empty base64 is refused by the schema: "decodes to 0 bytes"
        _refused(client.post("/v1/search", json={"image_b64": b64}), status, *words)
        _refused(client.put(f"/v1/products/{ANCHOR}", json={"title": "replaced", "image_b64": b64}), status, *words)
    else:
        _refused(client.post("/v1/search", json={"image_b64": b64}), 422, "image_b64", "0 bytes")
    _assert_anchor_intact(client, anchor)


# ---------------------------------------------------------------- text


def test_huge_text_is_refused_by_length_not_by_crashing(client):
    """A 60,000-character query string (the most an HTTP client sends; servers cap request lines)
    and 1 MB JSON strings are refused with the limit named."""
    _refused(client.get("/v1/search", params={"q": "shoe " * 12_000}), 422, "query.q", "2000")
    _refused(client.post("/v1/search", json={"text": "x" * 1_000_000}), 422, "body.text", "2000")
    _refused(client.put("/v1/products/HUGE-1", json={"title": "x" * 1_000_000}), 422, "body.title", "1000")
    r = client.put("/v1/products/HUGE-1", json={"title": "t", "description": "x" * 1_000_000})
    _refused(r, 422, "body.description")
    assert client.get("/v1/products/HUGE-1").status_code == 404


def test_control_characters_are_searched_and_logged_verbatim(client):
    """Control characters other than NUL are legal text: the query runs and is logged as sent."""
    text = "red\tshoe\x01\x1b[31m\x7f\u202e"
    r = client.get("/v1/search", params={"q": text, "k": 3})
    assert len(_hits(r)) == 3
    assert eventually(lambda: client.app.state.services.store.get_search(r.json()["query_id"]), timeout_s=10)["query_text"] == text


NUL_AND_SURROGATES = [
    # method, url, body (dict: JSON; bytes: raw JSON), words
    ("GET", "/v1/search?q=red%00shoe", None, ["query.q", "NUL"]),
    ("GET", "/v1/search?q=shoe&category=hats%00", None, ["query.category", "NUL"]),
    ("GET", "/v1/search?q=shoe&brand=a%00", None, ["query.brand", "NUL"]),
    ("PUT", "/v1/products/NUL-1", {"title": "t", "description": "a\x00b"}, ["body.description", "NUL"]),
    ("PUT", "/v1/products/NUL-1", {"title": "t", "attributes": {"k": "a\x00b"}}, ["attributes", "NUL"]),
    ("POST", "/v1/events", [{"event_id": "e\x00", "type": "click", "query_id": "q", "product_id": "p",
                             "position": 1, "ts": "2024-01-01T00:00:00Z"}], ["event_id", "NUL"]),
    # A version name is looked up in the database too (PostgreSQL refused it with a 500).
    ("POST", "/v1/models/a%00b/activate", None, ["path.version", "NUL"]),
    ("POST", "/v1/models/a%00b/canary", {"fraction": 0.5}, ["path.version", "NUL"]),
    ("DELETE", "/v1/models/a%00b/canary", None, ["path.version", "NUL"]),
    # So is a product id, on every product route (PostgreSQL answered 500, SQLite 404; only PUT checked).
    ("GET", "/v1/products/a%00b", None, ["path.product_id", "NUL"]),
    ("PUT", "/v1/products/a%00b", {"title": "t"}, ["path.product_id", "NUL"]),
    ("PATCH", "/v1/products/a%00b", {"price": 1}, ["path.product_id", "NUL"]),
    ("DELETE", "/v1/products/a%00b", None, ["path.product_id", "NUL"]),
    ("GET", "/v1/products/a%00b/image", None, ["path.product_id", "NUL"]),
    ("GET", "/v1/products/a%00b/images/1", None, ["path.product_id", "NUL"]),
    # A lone surrogate is valid JSON ("\ud800") but no UTF-8 text: no database can store it.
    ("POST", "/v1/search", b'{"text": "red \\ud800 shoe"}', ["body.text", "unicode"]),
    ("POST", "/v1/search", b'{"text": "a", "filters": {"brand": "\\udfff"}}', ["body.filters.brand", "unicode"]),
    ("PUT", "/v1/products/SUR-1", b'{"title": "t\\udc00"}', ["body.title", "unicode"]),
    ("PUT", "/v1/products/SUR-1", b'{"title": "t", "attributes": {"\\ud800": 1}}', ["attributes", "surrogate"]),
    ("PUT", "/v1/products/SUR-1", b'{"title": "t", "attributes": {"a": ["\\ud800"]}}', ["attributes", "surrogate"]),
    # ... and in a query string it arrives as CESU-8 bytes (ED A0 80), which are not UTF-8.
    ("GET", "/v1/search?q=a%ED%A0%80b", None, ["query.q", "not valid UTF-8"]),
    ("GET", "/v1/search?q=caf%E9", None, ["query.q", "not valid UTF-8"]),
    ("GET", "/v1/search?q=shoe&category=%C3%28", None, ["query.category", "not valid UTF-8"]),
    ("POST", "/v1/search", b'{"text": "caf\xe9"}', ["malformed JSON", "not UTF-8"]),
    ("PUT", "/v1/products/SUR-1", b'{"title": "\xff\xfe"}', ["malformed JSON", "not UTF-8"]),
]


@pytest.mark.parametrize("method, url, body, words", NUL_AND_SURROGATES)
def test_nul_lone_surrogates_and_invalid_utf8_are_refused(client, method, url, body, words):
    """NUL, lone surrogates and bytes that are not UTF-8, in queries, filters, product fields,
    attributes and events: a 422 naming the field (never searched for as U+FFFD, never a 500
    from the database)."""
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else (
        {"json": body} if body is not None else {})
    _refused(client.request(method, url, **kwargs), 422, *words)
    for pid in ("NUL-1", "SUR-1"):
        assert client.get(f"/v1/products/{pid}").status_code == 404


def test_multipart_fields_that_are_not_utf8(client, anchor):
    """In a multipart form, a field *name* that is not UTF-8 is an unknown field (422); a field
    *value* that is not UTF-8 is read as Latin-1, which is what Starlette does and what a legacy
    browser meant (no valid UTF-8 value is ever read that way): the filter is applied as such and
    logged, the answer is clean."""
    file = (b'name="file"; filename="q.png"', anchor["image"], b"image/png")
    body, headers = _multipart((b'name="cat\xffegory"', b"hats", None), file)
    _refused(client.post("/v1/search/image", content=body, headers=headers), 422, "unknown field")
    body, headers = _multipart((b'name="category"', b"caf\xe9", None), file)
    r = client.post("/v1/search/image", content=body, headers=headers)
    assert _hits(r) == []  # no category "café"
    assert eventually(lambda: client.app.state.services.store.get_search(r.json()["query_id"]), timeout_s=10)["filters"] == {"category": ["caf\xe9"]}
    body, headers = _multipart((b'name="category"', b"a\x00b", None), file)
    _refused(client.post("/v1/search/image", content=body, headers=headers), 422, "body.category", "NUL")


# ---------------------------------------------------------------- content types, JSON types, k and offset


def test_wrong_content_types(client, anchor):
    """JSON routes want JSON, the upload route wants multipart with a `file`; anything else is a
    422 saying what is missing or malformed."""
    _refused(client.post("/v1/search", content=b'{"text": "shoe"}', headers={"content-type": "text/plain"}), 422, "body")
    _refused(client.post("/v1/search", data={"text": "shoe"}), 422, "body")
    r = client.put("/v1/products/CT-1", content=b'{"title": "t"}', headers={"content-type": "application/xml"})
    _refused(r, 422, "body")
    _refused(client.post("/v1/events", data={"event_id": "e"}), 422, "body")
    _refused(client.post("/v1/search/image", json={"k": 5}), 422, "body.file")
    _refused(client.post("/v1/search/image", data={"file": "not a file", "k": "5"}), 422, "body.file")
    r = client.post("/v1/search/image", content=anchor["image"], headers={"content-type": "image/png"})
    _refused(r, 422, "body.file")
    _refused(client.post("/v1/search/image", content=b"--x\r\nnot a part\r\n--x--\r\n",
                         headers={"content-type": "multipart/form-data"}), 422, "multipart")
    _refused(client.post("/v1/search/image", content=b"--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--\r\n",
                         headers={"content-type": "multipart/form-data; boundary=x"}), 422, "multipart")
    _refused(client.post("/v1/search", content=b"[" * 100_000 + b"]" * 100_000,
                         headers={"content-type": "application/json"}), 422, "nested too deeply")
    assert client.get("/v1/products/CT-1").status_code == 404


WRONG_TYPES = [
    ("POST", "/v1/search", {"text": "a", "k": True}, "body.k", "true or false"),
    ("POST", "/v1/search", {"text": "a", "offset": False}, "body.offset", "true or false"),
    ("POST", "/v1/search", {"text": "a", "k": 2.5}, "body.k", "integer"),
    ("POST", "/v1/search", {"text": "a", "k": [5]}, "body.k", "integer"),
    ("POST", "/v1/search", {"text": ["a"]}, "body.text", "string"),
    ("POST", "/v1/search", {"text": {"q": "a"}}, "body.text", "string"),
    ("POST", "/v1/search", {"text": "a", "target": 1}, "body.target", "'image', 'text' or 'hybrid'"),
    ("POST", "/v1/search", {"text": "a", "filters": "hats"}, "body.filters", "dictionary"),
    ("POST", "/v1/search", {"text": "a", "filters": {"category": 5}}, "body.filters.category", "list"),
    ("POST", "/v1/search", {"text": "a", "filters": {"category": [["hats"]]}}, "body.filters.category.0", "string"),
    ("POST", "/v1/search", {"text": "a", "filters": {"price_max": True}}, "body.filters.price_max", "true or false"),
    ("POST", "/v1/search", {"text": "a", "filters": {"price_min": "cheap"}}, "body.filters.price_min", "number"),
    ("POST", "/v1/search", {"similar_to": ["P00001"]}, "body.similar_to", "string"),
    ("POST", "/v1/search", {"image_b64": 12345}, "body.image_b64", "string"),
    ("PUT", "/v1/products/TYPE-1", {"title": ["t"]}, "body.title", "string"),
    ("PUT", "/v1/products/TYPE-1", {"title": "t", "price": True}, "body.price", "true or false"),
    ("PUT", "/v1/products/TYPE-1", {"title": "t", "price": {"amount": 3}}, "body.price", "number"),
    ("PUT", "/v1/products/TYPE-1", {"title": "t", "currency": "euro!"}, "body.currency", "pattern"),
    ("PUT", "/v1/products/TYPE-1", {"title": "t", "attributes": [1, 2]}, "body.attributes", "dictionary"),
    ("PUT", "/v1/products/TYPE-1", b'{"title": "t", "attributes": {"a": 1e999}}', "attributes", "NaN or infinite"),
    ("PUT", "/v1/products/TYPE-1", [{"title": "t"}], "body", "dictionary"),
    ("PUT", "/v1/products/TYPE-1", {"title": "t", "stock": "many"}, "body.stock", "integer"),
    ("PATCH", "/v1/products/P00017", {}, "body", "at least one field"),
    ("PATCH", "/v1/products/P00017", {"price": True}, "body.price", "true or false"),
    ("PATCH", "/v1/products/P00017", {"stock": [1]}, "body.stock", "integer"),
    ("PATCH", "/v1/products/P00017", {"colour": "red"}, "body.colour", "unknown field"),
    ("PATCH", "/v1/products/P00017", {"attributes": "red"}, "body.attributes", "dictionary"),
    ("POST", "/v1/search", {"text": "a", "filters": {"attributes": {"c": {"x": {"y": 1}}}}}, "body.filters.attributes",
     "nested attributes are not filterable"),
    ("POST", "/v1/search", {"text": "a", "filters": {"attributes": {"c": [[1, 2]]}}}, "body.filters.attributes",
     "not filterable"),
    ("POST", "/v1/search", {"text": "a", "filters": {"attributes": "color=red"}}, "body.filters.attributes", "object"),
    ("POST", "/v1/search", {"text": "a", "filters": {"in_stock": [True]}}, "body.filters.in_stock", "boolean"),
    # JSON 0/1 and "true" are not booleans: pydantic's lax mode read 0 as false (found by the schema fuzzer)
    ("POST", "/v1/search", {"text": "a", "filters": {"in_stock": 0}}, "body.filters.in_stock", "boolean"),
    ("POST", "/v1/search", {"text": "a", "filters": {"in_stock": "true"}}, "body.filters.in_stock", "boolean"),
    ("POST", "/v1/search", {"text": "a", "facets": ["category"] * 9}, "body.facets", "at most 8"),
    ("POST", "/v1/search", {"text": "a", "facets": ["attributes.x" * 100]}, "body.facets.0", "at most"),
    ("POST", "/v1/events", {"event_id": "e"}, "body", "list"),
    ("POST", "/v1/events", [{"event_id": "e", "type": "click", "query_id": "q", "product_id": "p", "position": True,
                             "ts": "2024-01-01T00:00:00Z"}], "body.0.position", "true or false"),
    ("POST", "/v1/events", [{"event_id": "e", "type": "click", "query_id": "q", "product_id": "p", "position": 1,
                             "ts": "2024-01-01T00:00:00"}], "body.0.ts", "timezone"),
    ("POST", "/v1/events", [{"event_id": "e", "type": "like", "query_id": "q", "product_id": "p", "position": 1,
                             "ts": "2024-01-01T00:00:00Z"}], "body.0.type", "'impression' or 'click'"),
]


@pytest.mark.parametrize("method, url, body, where, words", WRONG_TYPES)
def test_json_of_the_wrong_types_is_refused(client, method, url, body, where, words):
    """Wrong JSON types (booleans for numbers, lists for strings, strings for objects ...) are a
    422 naming the field; true/false is not read as 1/0, a price is not a bag of keys."""
    if isinstance(body, bytes):
        r = client.request(method, url, content=body, headers={"content-type": "application/json"})
    else:
        r = client.request(method, url, json=body)
    _refused(r, 422, where, words)
    assert client.get("/v1/products/TYPE-1").status_code == 404


def test_currency_is_a_three_letter_code_as_in_catalogs(client):
    """PUT checks currency like `prism index` does (3 letters, stored upper-case)."""
    r = client.put("/v1/products/CUR-1", json={"title": "priced", "price": 3, "currency": "usd"})
    assert r.status_code == 201 and r.json()["currency"] == "USD", r.text


BAD_PAGING = [
    ("k", "-1", "greater than or equal to 1"), ("k", "0", "greater than or equal to 1"),
    ("k", "1000000000000000000000000000000", "less than or equal to 1000"), ("k", "1e4", "integer"),
    ("offset", "-5", "greater than or equal to 0"),
    ("offset", "99999999999999999999", "less than or equal to 999"), ("offset", "0x10", "integer"),
]


@pytest.mark.parametrize("name, value, words", BAD_PAGING)
def test_negative_and_huge_k_and_offset_everywhere(client, anchor, name, value, words):
    """k and offset out of range, astronomically large or not integers: 422 on the query string,
    in JSON (as numbers where JSON has them) and in the upload form."""
    _refused(client.get("/v1/search", params={"q": "shoe", name: value}), 422, f"query.{name}", words)
    try:
        number = json.loads(value)
    except ValueError:
        number = value
    _refused(client.post("/v1/search", json={"text": "shoe", name: number}), 422, f"body.{name}")
    _refused(_upload(client, anchor["image"], **{name: value}), 422, f"body.{name}")


def test_repeated_single_valued_form_fields_are_refused(client, anchor):
    """Two files or two k's in one upload: which was meant? Refused like `q=a&q=b`."""
    data = anchor["image"]
    two = [("file", ("a.png", data, "image/png")), ("file", ("b.png", data, "image/png"))]
    r = client.post("/v1/search/image", files=two)
    _refused(r, 422, "body.file", "give it once")
    _refused(_upload(client, data, k=["1", "5"]), 422, "body.k", "give it once")
    _refused(_upload(client, data, target=["image", "text"]), 422, "body.target", "give it once")
    assert len(_hits(_upload(client, data, category=["hats", "bags"]))) >= 1  # lists are lists


def test_unknown_fields_are_refused_not_ignored(client):
    """Unknown fields in a product or an event are a 422 naming them (not silently dropped)."""
    _refused(client.put("/v1/products/UNK-1", json={"title": "t", "colour": "red"}), 422, "body.colour: unknown field")
    _refused(client.put("/v1/products/UNK-1", json={"title": "t", "image": "a.png"}), 422, "body.image: unknown field")
    event = {"event_id": "e", "type": "click", "query_id": "q", "product_id": "p", "position": 1,
             "ts": "2024-01-01T00:00:00Z", "user": "bob"}
    _refused(client.post("/v1/events", json=[event]), 422, "body.0.user: unknown field")
    _refused(client.get("/v1/search", params={"q": "shoe", "filters": "x"}), 422, "query.filters: unknown field")
    assert client.get("/v1/products/UNK-1").status_code == 404


def test_an_indexed_image_swapped_for_a_fifo_is_not_read(client, settings):
    """The image route reads the file of record; if it was replaced by a FIFO (or a link to
    /dev/zero) since indexing, it answers 404 at once instead of blocking or reading forever."""
    image = _encode(draw_product_image(7007), "PNG")
    assert client.put("/v1/products/FIFO-1", json={"title": "t", "image_b64": _b64(image)}).status_code == 201
    stored = next((settings.home / "images").glob(f"{hashlib.sha256(image).hexdigest()}.*"))
    stored.unlink()
    os.mkfifo(stored)
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=client.get("/v1/products/FIFO-1/image")), daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # unblock the reader before failing, or the test run would hang
        with open(stored, "wb"):
            pass
        worker.join(5)
        pytest.fail("the image route blocked opening a FIFO")
    _refused(result["r"], 404, "no longer readable")


def test_no_request_above_got_a_5xx_and_nothing_stored_was_lost(client, anchor):
    """Every answer this module got was < 500 (the server's own request counter), and the
    catalog is as it was, plus the products the tests above added on purpose."""
    metrics = client.get("/metrics").text
    server_errors = [line for line in metrics.splitlines()
                     if line.startswith("prism_http_requests_total") and 'status="5' in line]
    assert server_errors == []
    _assert_anchor_intact(client, anchor)
    added = {"EXIF-1", "PIXEL-1", "CUR-1", "FIFO-1"}
    present = {pid for pid in added if client.get(f"/v1/products/{pid}").status_code == 200}
    assert client.get("/v1/facets").json()["products"] == anchor["products"] + len(present)


# ---------------------------------------------------------------- hostile catalogs


@pytest.fixture(scope="module")
def cli_home(build_serving_home, databases):
    """A serving home for `prism index` runs, and the environment to run it in."""
    settings = build_serving_home("hostile-cli-home")
    return settings, databases.env(settings.home, PRISM_MODEL=TINY, PRISM_THREADS="1")


@pytest.fixture(scope="module")
def cli_anchor(cli_home, images):
    settings, _ = cli_home
    with TestClient(create_app(settings)) as c:
        return {"product": c.get(f"/v1/products/{ANCHOR}").json(), "image": (images / "00017.png").read_bytes(),
                "index_version": c.get("/readyz").json()["index_version"]}


def _served(settings):
    return TestClient(create_app(settings))


def _index(args, env):
    proc = run_prism(["index", *map(str, args)], env, check=False, timeout=240)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    return proc


def test_hostile_rows_are_reported_and_skipped_by_prism_index(tmp_path, cli_home, cli_anchor, images):
    """One CSV with every kind of bad row, indexed with --image-root: path traversal, absolute
    paths and a symlink leaving the root, a FIFO and a directory as images, a duplicate id, a
    price that is no number, attributes that are not an object or nested 50,000 deep, a bad
    currency, and a bad row for a product already indexed. Good rows are indexed; image problems
    keep the product text-only with the reason; row problems are reported with their line; the
    run exits 0; the anchor product is untouched and still found by its image."""
    settings, env = cli_home
    root = tmp_path / "catalog"
    (root / "img").mkdir(parents=True)
    (root / "img" / "good.png").write_bytes(_encode(draw_product_image(5005), "PNG"))
    outside = tmp_path / "outside.png"
    outside.write_bytes(_encode(draw_product_image(5006), "PNG"))
    (root / "img" / "escape.png").symlink_to(outside)
    os.mkfifo(root / "img" / "fifo.png")
    (root / "img" / "folder.png").mkdir()
    deep = "[" * 50_000 + "]" * 50_000  # within the CSV field limit, far beyond Python's recursion limit
    rows = [
        ("H1", "good hat", "4.5", "EUR", "img/good.png", ""),                    # line 2
        ("H2", "traversal", "1", "EUR", "../../../../etc/passwd", ""),           # 3
        ("H3", "absolute outside", "1", "EUR", "/etc/hosts", ""),                # 4
        ("H4", "symlink outside", "1", "EUR", "img/escape.png", ""),             # 5
        ("H5", "fifo", "1", "EUR", "img/fifo.png", ""),                          # 6
        ("H6", "directory", "1", "EUR", "img/folder.png", ""),                   # 7
        ("H1", "duplicate", "1", "EUR", "", ""),                                 # 8
        ("H7", "bad price", "abc", "EUR", "", ""),                               # 9
        ("H8", "negative price", "-1", "EUR", "", ""),                           # 10
        ("H9", "list attributes", "1", "EUR", "", "[1, 2]"),                     # 11
        ("H10", "deep attributes", "1", "EUR", "", deep),                        # 12
        ("H11", "bad currency", "1", "EURO", "", ""),                            # 13
        (ANCHOR, "hijacked", "not a price", "EUR", "../../../etc/passwd", ""),   # 14
        ("", "no id", "1", "EUR", "", ""),                                       # 15
        ("H12", "nested attributes", "2", "usd", "", '{"size": {"eu": 42, "us": [9, 9.5]}}'),  # 16
    ]
    catalog = root / "hostile.csv"
    with open(catalog, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["product_id", "title", "price", "currency", "image", "attributes"])
        writer.writerows(rows)
    proc = _index([catalog, "--image-root", root, "--json"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    errors = {e["line"]: e["reason"] for e in summary["row_errors"]}
    assert errors[8] == "duplicate product_id (first seen at line 2)"
    assert "not a number" in errors[9] and ">= 0" in errors[10] and "JSON object" in errors[11]
    assert "nested too deeply" in errors[12] and "3-letter" in errors[13] and "not a number" in errors[14]
    assert errors[15] == "product_id is missing"
    assert set(errors) == {8, 9, 10, 11, 12, 13, 14, 15}
    assert summary["image_failures"] == {"rejected": 3, "unreadable": 2}

    with _served(settings) as c:
        assert c.get("/readyz").json()["index_version"] == summary["index_version"] != cli_anchor["index_version"]
        status = {pid: c.get(f"/v1/products/{pid}").json()["image_status"] for pid in ("H1", "H2", "H3", "H4", "H5", "H6")}
        assert status == {"H1": "ok", "H2": "rejected", "H3": "rejected", "H4": "rejected",
                          "H5": "unreadable", "H6": "unreadable"}
        store = c.app.state.services.store
        assert "escapes the image root" in store.get_product("H4").attributes["_image_rejected"]
        assert c.get("/v1/products/H12").json()["attributes"] == {"size": {"eu": 42, "us": [9, 9.5]}}
        assert c.get("/v1/products/H12").json()["currency"] == "USD"
        assert c.get("/v1/products/H2/image").status_code == 404  # nothing outside the root is served
        assert c.get(f"/v1/products/{ANCHOR}").json() == cli_anchor["product"]
        top = _hits(_upload(c, cli_anchor["image"], k="1"))
        assert top[0][0] == ANCHOR and top[0][1] == pytest.approx(1.0, abs=1e-4)
        found = _hits(c.get("/v1/search", params={"q": "traversal", "target": "text", "k": 1}))
        assert found[0][0] == "H2"  # text-only, still searchable


def test_hostile_jsonl_lines_are_row_errors_not_crashes(tmp_path, cli_home, cli_anchor):
    """A JSONL with a broken line, wrong types (ids that are floats, booleans, lists; a title
    that is an object; a price that is an object) and values no database can store (lone
    surrogates, 100,000-deep nesting): each bad line is a row error, the rest is indexed. Lone
    surrogates and deep nesting used to crash `prism index` with a traceback."""
    settings, env = cli_home
    lines = [
        json.dumps({"product_id": "J1", "title": "fine jacket", "price": 10}),                       # 1
        '{"product_id": "J2", "title": "broken',                                                       # 2
        json.dumps({"product_id": 1.5, "title": "float id"}),                                         # 3
        json.dumps({"product_id": True, "title": "bool id"}),                                         # 4
        json.dumps({"product_id": ["J5"], "title": "list id"}),                                       # 5
        json.dumps({"product_id": "J6", "title": {"en": "nested title"}}),                           # 6
        json.dumps({"product_id": "J7", "title": "t", "price": {"amount": 3}}),                      # 7
        '{"product_id": "J8", "title": "lone \\ud800 surrogate"}',                                     # 8
        '{"product_id": "J9", "title": "t", "colour": "\\udfff"}',                                     # 9
        '{"product_id": "J10", "title": "t", "attributes": ' + "[" * 100_000 + "]" * 100_000 + "}",  # 10
        "[1, 2, 3]",                                                                                   # 11
        json.dumps({"product_id": 12345678901234567890, "title": "integer id"}),                      # 12
    ]
    catalog = tmp_path / "hostile.jsonl"
    catalog.write_text("\n".join(lines) + "\n")
    proc = _index([catalog, "--json"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    errors = {e["line"]: e["reason"] for e in summary["row_errors"]}
    assert set(errors) == {2, 3, 4, 5, 6, 7, 8, 9, 10, 11}, errors
    assert "invalid JSON" in errors[2] and "string or an integer" in errors[3]
    assert "got bool" in errors[4] and "got list" in errors[5] and "got dict" in errors[6]
    assert "not a number" in errors[7] and "surrogate" in errors[8] and "surrogate" in errors[9]
    assert "nested too deeply" in errors[10] and "JSON object" in errors[11]
    with _served(settings) as c:
        assert c.get("/v1/products/J1").status_code == 200
        assert c.get("/v1/products/12345678901234567890").status_code == 200
        assert c.get(f"/v1/products/{ANCHOR}").json() == cli_anchor["product"]


def _parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


CATALOG_FAILURES = {
    # name: (writes the file, words in the error)
    "not-utf8.csv": (lambda p: p.write_bytes("product_id,title\nL1,caf\xe9 cr\xe8me\n".encode("latin-1")),
                     ["not UTF-8", "iconv"]),
    "utf16.csv": (lambda p: p.write_bytes("product_id,title\nU1,x\n".encode("utf-16")), ["not UTF-8"]),
    "empty.csv": (lambda p: p.write_bytes(b""), ["missing required column(s) product_id, title"]),
    "empty.jsonl": (lambda p: p.write_bytes(b""), ["has no product rows"]),
    "header-only.csv": (lambda p: p.write_text("product_id,title\n"), ["has no product rows"]),
    "missing-title.csv": (lambda p: p.write_text("product_id,name\nA,b\n"),
                          ["missing required column(s) title", "found product_id, name"]),
    "wrong-schema.parquet": (lambda p: _parquet(p, {"id": ["a"], "name": ["b"]}),
                             ["missing required column(s) product_id, title"]),
    "garbage.parquet": (lambda p: p.write_bytes(b"PAR1 this is not parquet"), ["cannot read garbage.parquet as Parquet"]),
    "catalog.xlsx": (lambda p: p.write_bytes(b"PK\x03\x04"), ["unsupported catalog format '.xlsx'"]),
    "a-directory.csv": (lambda p: p.mkdir(), ["catalog file not found"]),
    # over 16 MiB in one cell: no row can be cut out of that (smaller ones are row errors, test_catalog)
    "huge-field.csv": (lambda p: p.write_text("product_id,title\nA," + "x" * 17_000_000 + "\n"),
                       ["malformed CSV at line 2", "field larger than field limit"]),
}
CLI_FAILURES = ("not-utf8.csv", "empty.jsonl", "wrong-schema.parquet")  # the rest in-process: a CLI run costs ~5 s


@pytest.mark.parametrize("name", CLI_FAILURES)
def test_unreadable_catalogs_fail_the_cli_with_a_message(tmp_path, cli_home, cli_anchor, name):
    """A catalog that cannot be read at all: `prism index` exits 2 with `error: <what and how to
    fix>`, no traceback, and the serving index version and the catalog are unchanged."""
    settings, env = cli_home
    write, words = CATALOG_FAILURES[name]
    path = tmp_path / name
    write(path)
    with _served(settings) as c:
        before = c.get("/readyz").json()["index_version"]
    proc = _index([path], env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "error:" in proc.stderr and all(w in proc.stderr for w in words), proc.stderr
    with _served(settings) as c:
        assert c.get("/readyz").json()["index_version"] == before
        assert c.get(f"/v1/products/{ANCHOR}").json() == cli_anchor["product"]


@pytest.mark.parametrize("name", sorted(set(CATALOG_FAILURES) - set(CLI_FAILURES)))
def test_unreadable_catalogs_fail_the_indexer_before_anything_is_written(tmp_path, cli_home, cli_anchor, tiny_embedder,
                                                                         name):
    """The same through the indexer API: CatalogError naming the file and the problem, raised
    before any product is written or any index version built."""
    from indexer import CatalogError, CatalogIndexer, IndexOptions
    from store import Store

    settings, _ = cli_home
    write, words = CATALOG_FAILURES[name]
    path = tmp_path / name
    write(path)
    store = Store.open(settings.db_url)
    try:
        versions = len(store.list_index_versions())
        with pytest.raises(CatalogError) as exc:
            CatalogIndexer(home=settings.home, store=store, embedder=tiny_embedder, options=IndexOptions()).run(path)
        assert all(w in str(exc.value) for w in words), str(exc.value)
        assert len(store.list_index_versions()) == versions
        assert store.get_product(ANCHOR).title == cli_anchor["product"]["title"]
    finally:
        store.close()


def test_parquet_columns_of_the_wrong_types_are_row_errors(tmp_path, cli_home, cli_anchor, tiny_embedder):
    """A Parquet file with the right column names but the wrong types (float ids, a price column
    of strings, a struct where text belongs): every bad row is reported, the good ones indexed."""
    from indexer import CatalogIndexer, IndexOptions
    from store import Store

    settings, _ = cli_home
    path = _parquet(tmp_path / "types.parquet", {
        "product_id": [1.0, 2.5, 3.0],
        "title": ["float id", "float id", "float id"],
    })
    typed = _parquet(tmp_path / "typed.parquet", {
        "product_id": ["Q1", "Q2", "Q3"],
        "title": ["ok", "ok", "ok"],
        "price": ["9.5", "abc", "-2"],
        "brand": [{"name": "acme"}, None, None],
    })
    store = Store.open(settings.db_url)
    try:
        indexer = CatalogIndexer(home=settings.home, store=store, embedder=tiny_embedder, options=IndexOptions())
        summary = indexer.run(path)
        assert [(e.line, e.reason) for e in summary.row_errors] == [
            (n, "product_id must be a string or an integer") for n in (1, 2, 3)]
        summary = indexer.run(typed)
        assert {e.line: e.reason for e in summary.row_errors} == {
            1: "brand must be a string, got dict", 2: "price 'abc' is not a number",
            3: "price '-2' must be a finite number >= 0",
        }
        assert store.get_product("Q1") is None and store.get_product(ANCHOR).title == cli_anchor["product"]["title"]
    finally:
        store.close()


def test_device_files_are_never_read_as_images(tmp_path):
    """/dev/zero has st_size 0 and never ends: a catalog row naming it once made the indexer read
    until the machine ran out of memory. Checked in a subprocess capped at 1 GiB of address space
    (so a regression fails instead of taking the machine down), loading only embedder/images.py."""
    images_py = Path(__file__).resolve().parents[1] / "embedder" / "images.py"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code = f"""
import importlib.util, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
spec = importlib.util.spec_from_file_location("images", {str(images_py)!r})
images = sys.modules["images"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(images)
for path in ("/dev/zero", "/dev/urandom", {str(fifo)!r}, {str(tmp_path)!r}):
    try:
        images.read_image_bytes(path, images.ImageLimits())
        print(path, "READ")
    except images.ImageDecodeError as exc:
        print(path, exc.reason, exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and all(" unreadable " in line and "not a regular file" in line for line in lines), lines
