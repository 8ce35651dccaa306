import os
import sys
from pathlib import Path

# Before anything imports huggingface_hub: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pytest  # noqa: E402

TINY = "prism-tiny-vit:random"


def pytest_collection_modifyitems(config, items):
    if config.getoption("--database") != "postgresql":
        return
    skip = pytest.mark.skip(reason="touches no database: the SQLite run of the suite covers it")
    for item in items:
        if item.get_closest_marker("no_database"):
            item.add_marker(skip)


def pytest_addoption(parser):
    parser.addoption(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="run every test against SQLite files (default) or PostgreSQL at $PRISM_TEST_DATABASE_URL",
    )


@pytest.fixture(scope="session")
def databases(request):
    """Database URLs and subprocess environments per PRISM_HOME (see tests/prism_databases.py)."""
    from prism_databases import TestDatabases

    server = None
    if request.config.getoption("--database") == "postgresql":
        server = os.environ.get("PRISM_TEST_DATABASE_URL")
        if not server:
            pytest.exit("--database postgresql needs PRISM_TEST_DATABASE_URL (see README: `.ci/with-postgres`)", returncode=4)
    dbs = TestDatabases(server)
    yield dbs
    dbs.drop_all()


@pytest.fixture(autouse=True)
def _drop_test_databases(request, databases):
    """On PostgreSQL, a test's databases go when the test ends, as its tmp_path does."""
    yield
    tmp_path = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    if databases.postgres and tmp_path is not None:
        databases.drop_under(tmp_path)


@pytest.fixture(scope="session")
def tiny_embedder():
    from embedder import load_embedder

    return load_embedder(TINY, device="cpu")


@pytest.fixture
def store(tmp_path, databases):
    from store import Store

    s = Store.open(databases.url(tmp_path))
    yield s
    s.close()


@pytest.fixture(scope="session")
def small_catalog(tmp_path_factory):
    from sample_catalog import make_catalog

    root = tmp_path_factory.mktemp("catalog")
    return make_catalog(root, 120)


@pytest.fixture(scope="session")
def build_serving_home(tmp_path_factory, small_catalog, tiny_embedder, databases):
    """Factory: a fresh PRISM_HOME with the small catalog indexed by the tiny model; returns settings."""
    from api.settings import PrismSettings
    from indexer import CatalogIndexer, IndexOptions
    from store import Store

    def build(name: str, **settings) -> "PrismSettings":
        home = tmp_path_factory.mktemp(name)
        prism_settings = PrismSettings(home=home, device="cpu", model=TINY, database_url=databases.url(home), **settings)
        # Indexed as `prism index` would with these settings (text fields, identifier attributes).
        store = Store.open(databases.url(home), lexical=prism_settings.lexical())
        try:
            CatalogIndexer(home=home, store=store, embedder=tiny_embedder, options=IndexOptions(batch_size=32)).run(
                small_catalog
            )
        finally:
            store.close()
        return prism_settings

    return build


@pytest.fixture(scope="session")
def small_demo_home(tmp_path_factory, databases):
    """`prism demo --no-serve` on 150 OpenMoji products, 60 one-batch epochs, as a user runs it.

    Returns (home, env, the first run's process). Tests that change the home work on a copy.
    """
    from prism_cli import run_prism

    home = tmp_path_factory.mktemp("demo-home")
    env = databases.env(home, PRISM_THREADS="2")
    # ~2 minutes alone; the timeout only guards against a hang (a host shared with other jobs took 7).
    first = run_prism(["demo", "--no-serve", "--limit", "150", "--epochs", "60"], env, timeout=1500)
    return home, env, first


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height whose compressed size is tiny: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def bad_images(small_catalog) -> dict[str, bytes]:
    """Uploads that must be refused: a truncated PNG, a zip archive, a 20000x20000 PNG, a
    2,000,000x1 PNG, plain text."""
    import io
    import zipfile

    good = (small_catalog.parent / "images" / "00003.png").read_bytes()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("catalog.csv", "product_id,title\nA,a\n" * 50)
    return {
        "truncated": good[: len(good) // 3],
        "zip": archive.getvalue(),
        "bomb": png_bomb(20000, 20000),
        "strip": png_bomb(2_000_000, 1),  # few pixels, but resizing its short side would take gigabytes
        "text": b"just some text, not an image",
    }
