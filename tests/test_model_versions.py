"""Model versions on disk: written like index versions (temp dir, fsync, rename, row) and checked
against their sha256 digests on load, so a damaged file is refused by name, never served as garbage."""

import hashlib
import json

import numpy as np
import pytest

from embedder import ModelIntegrityError, create_base_model, load_embedder, prism_config_path
from feedback import read_model_json, write_model_version

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

ARCH = "prism-tiny-vit"


@pytest.fixture(scope="module")
def tiny_model():
    model, _, _ = create_base_model(ARCH, seed=0)
    return model


def _write(models, model, store=None, version="ft-1"):
    return write_model_version(models, version, model, arch=ARCH, config_file=prism_config_path(ARCH),
                               info={"note": "test"}, store=store)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_model_version_lists_its_digests_and_leaves_no_temp_dir_or_marker(tmp_path, tiny_model, store):
    models = tmp_path / "models"
    path = _write(models, tiny_model, store)
    meta = json.loads((path / "model.json").read_text())
    assert meta["files"] == {"checkpoint.pt": _sha256(path / "checkpoint.pt"),
                             f"{ARCH}.json": _sha256(path / f"{ARCH}.json")}
    assert [p.name for p in models.iterdir()] == ["ft-1"]  # no .ft-1.tmp-*, no .pending-ft-1
    assert store.get_model_version("ft-1").info["files"] == meta["files"]
    # what a caller passes in `info` cannot replace the digests the loader checks
    other = write_model_version(models, "ft-2", tiny_model, arch=ARCH, config_file=prism_config_path(ARCH),
                                info={"files": {}})
    assert read_model_json(models, "ft-2")["files"]["checkpoint.pt"] == _sha256(other / "checkpoint.pt")


def _flip_middle(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))  # same size: only the digest can tell


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("damage", "file", "words"), [
    (_flip_middle, "checkpoint.pt", "does not match its sha256"),
    (_truncate, "checkpoint.pt", "does not match its sha256"),
    (lambda p: p.unlink(), "checkpoint.pt", "is missing"),
    (_flip_middle, f"{ARCH}.json", "does not match its sha256"),
    (_truncate, "model.json", "is unreadable"),
])
def test_a_damaged_model_file_is_refused_by_name(tmp_path, tiny_model, damage, file, words):
    models = tmp_path / "models"
    path = _write(models, tiny_model)
    load_embedder("ft-1", models_dir=models, device="cpu")  # intact, it loads
    damage(path / file)
    with pytest.raises(ModelIntegrityError) as refused:
        load_embedder("ft-1", models_dir=models, device="cpu")
    assert file in str(refused.value) and words in str(refused.value) and "'ft-1'" in str(refused.value)


def test_a_version_written_before_digests_loads_as_it_is(tmp_path, tiny_model):
    models = tmp_path / "models"
    path = _write(models, tiny_model)
    expected = load_embedder("ft-1", models_dir=models, device="cpu").encode_texts(["red apple"])
    meta = json.loads((path / "model.json").read_text())
    del meta["files"]
    (path / "model.json").write_text(json.dumps(meta))
    loaded = load_embedder("ft-1", models_dir=models, device="cpu")
    np.testing.assert_allclose(loaded.encode_texts(["red apple"]), expected, atol=1e-6)


def test_a_write_that_fails_leaves_nothing_behind(tmp_path, tiny_model, store):
    models = tmp_path / "models"
    with pytest.raises(FileNotFoundError):
        write_model_version(models, "ft-1", tiny_model, arch=ARCH, config_file=tmp_path / "no-such-config.json",
                            info={}, store=store)
    assert list(models.iterdir()) == []
    assert store.get_model_version("ft-1") is None
