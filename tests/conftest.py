import os
import sys
from pathlib import Path

# Before anything imports huggingface_hub: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pytest  # noqa: E402

TINY = "prism-tiny-vit:random"


@pytest.fixture(scope="session")
def tiny_embedder():
    from embedder import load_embedder

    return load_embedder(TINY, device="cpu")


@pytest.fixture
def store(tmp_path):
    from store import Store

    s = Store.open(f"sqlite:///{tmp_path / 'prism.db'}")
    yield s
    s.close()


@pytest.fixture(scope="session")
def small_catalog(tmp_path_factory):
    from sample_catalog import make_catalog

    root = tmp_path_factory.mktemp("catalog")
    return make_catalog(root, 120)
