"""One list of accepted image formats (embedder.ACCEPTED_IMAGE_FORMATS), used everywhere: the
decoder, its error messages, the API schema, the image route and the README."""

import io
from pathlib import Path

import pytest
from PIL import Image

from embedder import ACCEPTED_IMAGE_FORMATS, ACCEPTED_IMAGE_FORMATS_TEXT, ImageDecodeError, ImageLimits, decode_image

# Touches no database: the suite's SQLite run covers it, its PostgreSQL run skips it.
pytestmark = pytest.mark.no_database

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fmt", ACCEPTED_IMAGE_FORMATS)
def test_every_accepted_format_decodes_and_is_served_with_its_media_type(fmt):
    from api.routes.products import _MEDIA_TYPES

    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 40)).save(buf, format=fmt)
    assert decode_image(buf.getvalue(), ImageLimits()).size == (24, 16)
    assert _MEDIA_TYPES[fmt.upper()].startswith("image/")


@pytest.mark.parametrize("data", [b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", b"definitely not an image"])
def test_refusals_name_the_same_formats(data):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, ImageLimits())
    assert ACCEPTED_IMAGE_FORMATS_TEXT in str(err.value)


def test_the_schema_and_the_readme_list_the_same_formats():
    from api.schemas import SearchRequest

    assert ACCEPTED_IMAGE_FORMATS_TEXT in SearchRequest.model_fields["image_b64"].description
    uploads = " ".join(ROOT.joinpath("README.md").read_text().split("Uploads:", 1)[1].split(";", 1)[0].split())
    assert [f for f in ACCEPTED_IMAGE_FORMATS if f not in uploads] == []
