"""The nightly job: mine clicks, fine-tune the serving model, gate it on later clicks, promote.

One run, start to end:

1. take the job lock (two runs never overlap, on any host: `Store.cluster_lock`); a `prism worker`
   then claims the oldest queued run (`run_queued_retrain`), `prism retrain` starts one at once;
   mark runs that died half-way as failed and remove
   what they left: training checkpoints, and candidates written but never registered; delete the
   searches (query text is personal data) and their events older than `log_retention_days`,
   never younger than the `window_days` the job reads;
2. read the events of the last `window_days`, split them by time: the earlier searches train,
   the later `holdout_fraction` of them judge;
3. mine weighted click pairs from the earlier slice (`feedback.pairs`) and mix them with
   catalog (title, image) pairs, so the model keeps what it knew about the whole catalog;
4. fine-tune a copy of the serving model with Prism's trainer (checkpointed; resumable);
5. gate: score the candidate and the serving model on the later clicks (recall@10, MRR,
   nDCG@10 of the products clicked in the later searches: training-window clicks never judge)
   and on catalog self-retrieval (title -> image recall@1/10). Promote only if the lower bound
   of the bootstrap confidence interval (over later queries) of the MRR lift is above
   `min_mrr_gain` (0) and catalog recall@1 drops by at most `max_catalog_recall_drop`;
6. promote: write the model version, re-embed the catalog with it, build an index version and
   activate it in one transaction, compare-and-set: only while the index version the run
   started from is still active. Another version activated meanwhile (an operator's rollback)
   stands, and the run's decision is "superseded". Servers swap to it on their next query; the
   old version stays on disk and in SQL for `prism models activate` (rollback).

Every run, whatever its outcome, is a `training_runs` row. Nothing the serving version needs is
touched before the final activation, so a run killed at any point leaves serving as it was.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from embedder import (
    AdapterSettings,
    ModelSpecError,
    add_adapters,
    has_adapters,
    load_embedder,
    load_trainable,
    merge_adapters,
    wrap_open_clip,
)
from feedback.canary import CanaryPolicy, start_canary
from feedback.evaluate import embed_images, first_relevant_ranks, ndcg_at, rank_metrics
from feedback.pairs import ClickPair, MiningConfig, mine_pairs, normalise_query, split_by_time
from feedback.schedule import job_lock, this_process
from feedback.train import PairData, SilentProgress, TrainConfig, TrainProgress, train_contrastive, trainable_names
from feedback.versions import (
    pending_candidate,
    read_model_json,
    remove_unrecorded_candidates,
    training_workdir,
    write_adapter_version,
    write_model_version,
)
from indexer import CatalogIndexer, IndexOptions, product_text
from store import ActiveVersionChangedError, CanaryConflictError, IndexVersionRecord, ProductRecord, Store

log = logging.getLogger(__name__)

# A fine-tune of a working model: a small learning rate, its own temperature and BatchNorm
# statistics, look-alikes in one batch. Click and anchor sets are small, so epochs are cheap.
FINETUNE_TRAIN = TrainConfig(
    epochs=40,
    batch_size=128,
    lr=3e-4,
    weight_decay=0.05,
    warmup_steps=5,
    texts_per_image=1,
    group_batches=True,
    init_temperature=None,
    freeze_batchnorm=True,
    max_rotation_deg=4.0,
    seed=0,
    adapter_lr=1e-3,
)


@dataclass(frozen=True)
class GateConfig:
    holdout_fraction: float = 0.2  # the latest share of clicked searches, kept out of training
    # The lower bound of the confidence interval of the MRR lift on later clicks must be above
    # this (0: the candidate is better with `ci_level` confidence, not only on average).
    min_mrr_gain: float = 0.0
    max_catalog_recall_drop: float = 0.01  # catalog title->image recall@1 it may lose (one point)
    ci_level: float = 0.95  # two-sided bootstrap interval of the lift, over later queries
    bootstrap_resamples: int = 1000  # seeded (RetrainConfig.seed): the same data gives the same decision
    catalog_queries: int = 5000  # catalog self-retrieval: a seeded sample of titles
    gallery_max: int = 50_000  # images ranked per query: clicked and query products, then a sample


@dataclass(frozen=True)
class RetrainConfig:
    window_days: float = 30.0
    mining: MiningConfig = MiningConfig()
    gate: GateConfig = GateConfig()
    train: TrainConfig = FINETUNE_TRAIN
    catalog_mix: float = 0.8  # share of training items that are catalog (title, image) pairs; see docs/feedback.md
    min_pairs: int = 10  # fewer mined pairs than this: no training, the run is skipped
    seed: int = 0
    # Searches and their events older than this are deleted by every run; never fewer days than
    # `window_days` (see `prune_logs`).
    log_retention_days: float = 90.0
    prune_batch: int = 1_000  # searches deleted per transaction
    # "direct": a candidate that passes the gate is activated; "canary": it is started as an
    # interleaved canary on `canary_fraction` of searches, promoted only if it wins on live clicks.
    promotion: str = "direct"
    canary_fraction: float = 0.1
    canary: CanaryPolicy = CanaryPolicy()
    # LoRA adapters on the towers' trunks (base weights frozen), written as an adapter version over
    # the serving model version; None: fine-tune the weights themselves, as before adapters.
    adapters: AdapterSettings | None = AdapterSettings()
    # With adapters, a tower that has none is frozen whole (every base weight stays as served, and
    # its features are computed once per run instead of every step); False: it trains whole.
    freeze_unadapted: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class RetrainError(RuntimeError):
    """The job cannot run (nothing serving, a model Prism cannot fine-tune, ...)."""


@dataclass
class RetrainOutcome:
    run_id: int
    status: str  # succeeded | skipped | failed
    decision: str  # promoted | canary | rejected | superseded | none
    serving_model_version: str | None
    candidate_model_version: str | None = None
    index_version: str | None = None
    metrics: dict = field(default_factory=dict)
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClickQuery:
    """A logged query of the later slice and the products its shoppers clicked."""

    kind: str  # text | product
    query: str
    relevant: frozenset[str]
    weight: float = 1.0  # the inverse-propensity weight of its clicks


def run_retrain(
    store: Store,
    *,
    home: Path,
    config: RetrainConfig = RetrainConfig(),
    index_options: IndexOptions = IndexOptions(),
    device: str = "cpu",
    now: datetime | None = None,
    progress: TrainProgress | None = None,
) -> RetrainOutcome:
    """Run the job once, now (`prism retrain`). Raises `RetrainBusyError` (from feedback.schedule)
    if a run is under way on any process that shares the database."""
    home = Path(home)
    with job_lock(store, home):
        _remove_dead_runs(store, home)
        active = store.active_index_version()
        if active is None:
            raise RetrainError("no index version is serving: index a catalog first")
        run = store.start_training_run(serving_model_version=active.model_version, data_window={},
                                       serving_index_version=active.index_version, requested_by="cli",
                                       worker=this_process())
        return _execute(store, home, run.id, active, config, index_options, device, now, progress)


def run_queued_retrain(
    store: Store,
    *,
    home: Path,
    worker: str | None = None,
    config: RetrainConfig = RetrainConfig(),
    index_options: IndexOptions = IndexOptions(),
    device: str = "cpu",
    now: datetime | None = None,
    progress: TrainProgress | None = None,
) -> RetrainOutcome | None:
    """Claim the oldest queued run (`POST /v1/retrain`, the nightly schedule) and run it; None
    when none is queued. What `prism worker` does. Raises `RetrainBusyError` while another run
    holds the job lock: the queued run stays queued for the next try."""
    home = Path(home)
    with job_lock(store, home):
        _remove_dead_runs(store, home)
        run = store.claim_training_run(worker=worker or this_process())
        if run is None:
            return None
        active = store.active_index_version()
        if active is None:
            reason = "no index version is serving: index a catalog first"
            store.finish_training_run(run.id, status="failed", decision="none", metrics={"error": reason})
            return RetrainOutcome(run.id, "failed", "none", None, reason=reason)
        return _execute(store, home, run.id, active, config, index_options, device, now, progress)


def _remove_dead_runs(store: Store, home: Path) -> None:
    """Under the job lock no run is live: runs still marked running died half-way."""
    abandoned = store.abandon_running_training_runs("the run stopped before finishing (killed or crashed)")
    if abandoned:
        log.warning("marked %d unfinished training run(s) as failed", abandoned)
    # Their half-trained checkpoints cannot be resumed: the next run mines another window.
    for stale in (home / "models" / ".training").glob("ft-*"):
        shutil.rmtree(stale, ignore_errors=True)
    remove_unrecorded_candidates(home / "models", store)


def _execute(store: Store, home: Path, run_id: int, active: IndexVersionRecord, config: RetrainConfig,
             index_options: IndexOptions, device: str, now: datetime | None,
             progress: TrainProgress | None) -> RetrainOutcome:
    """Run `run_id` (already marked running) from the `active` index version, and record its outcome."""
    now = now or datetime.now(timezone.utc)
    window = {"start": (now - timedelta(days=config.window_days)).isoformat(), "end": now.isoformat()}
    store.record_training_run_start(run_id, serving_model_version=active.model_version,
                                    serving_index_version=active.index_version, data_window=window)
    retention: dict = {}
    # A long-lived `prism worker` store must compose product texts as the version it starts from
    # was built: an operator's `prism index` with other text fields may have run since it opened.
    store.follow_lexical(store.recorded_lexical())
    try:
        retention = prune_logs(store, config, now)
        outcome = _run(store, home, run_id, active, config, index_options, device, now, window,
                       progress or SilentProgress())
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        store.finish_training_run(run_id, status="failed", decision="none",
                                  metrics={"error": reason, **({"retention": retention} if retention else {})})
        raise
    outcome.metrics["retention"] = retention
    store.finish_training_run(
        run_id, status=outcome.status, decision=outcome.decision,
        metrics={**outcome.metrics, **({"reason": outcome.reason} if outcome.reason else {})},
        candidate_model_version=outcome.candidate_model_version, data_window=outcome.metrics.get("data_window"),
    )
    return outcome


def prune_logs(store: Store, config: RetrainConfig, now: datetime) -> dict:
    """Delete the searches logged more than `log_retention_days` before `now`, with their events.

    The window kept is never shorter than the one the job mines (`window_days`): a shorter
    setting is raised to it, with a warning, so retention can never starve the retrain.
    Returns what was done, for the run's metrics.
    """
    days = config.log_retention_days
    if days < config.window_days:
        log.warning(
            "PRISM_LOG_RETENTION_DAYS=%g is shorter than the %g days the retrain job reads "
            "(PRISM_RETRAIN_WINDOW_DAYS): keeping %g days of searches and events", days, config.window_days,
            config.window_days,
        )
        days = config.window_days
    before = now - timedelta(days=days)
    searches, events = store.prune_search_log(before, batch=config.prune_batch)
    log.info("retention: deleted %d searches and %d events logged before %s (%g days kept)",
             searches, events, before.isoformat(timespec="seconds"), days)
    return {"days": days, "configured_days": config.log_retention_days, "before": before.isoformat(),
            "searches_pruned": searches, "events_pruned": events}


def _run(store, home, run_id, active, config, index_options, device, now, window, progress) -> RetrainOutcome:
    models_dir = home / "models"
    serving = active.model_version
    events = store.events_between(now - timedelta(days=config.window_days), now)
    train_events, later, cut = gate_evidence(events, config)
    data_window = {**window, "split": cut.isoformat() if cut else None}
    mined = mine_pairs(train_events, config.mining)
    metrics: dict = {"data_window": data_window, "mining": mined.stats, "later_queries": len(later),
                     "config": config.to_dict()}

    def skipped(reason: str) -> RetrainOutcome:
        log.info("retrain skipped: %s", reason)
        return RetrainOutcome(run_id, "skipped", "none", serving, metrics=metrics, reason=reason)

    if config.promotion == "canary" and (running := store.running_canary()) is not None:
        # Its candidate could only be kept unserved: no training hours for that.
        return skipped(f"canary {running.id} of {running.candidate_index_version} is still running; "
                       "a retrain that ends in a canary waits for it to end")
    if len(mined.pairs) < config.min_pairs:
        return skipped(f"{len(mined.pairs)} click pairs mined, fewer than min_pairs={config.min_pairs}")
    if not later:
        return skipped("no later clicks to judge a candidate on")

    record = store.get_model_version(serving)
    spec = record.spec if record is not None else serving
    try:
        base = load_trainable(spec, device=device, models_dir=models_dir)
    except ModelSpecError as exc:
        raise RetrainError(f"cannot fine-tune the serving model {serving!r}: {exc}") from exc
    products = {p.product_id: p for p in store.live_products() if p.image_status == "ok" and p.image_uri}
    data, mix = _training_data(_without_identifier_queries(mined.pairs, store), products, config,
                               store.lexical.text_fields)
    metrics["training_items"] = mix
    # The run id makes the name unique however many hosts run the job (ids come from one database).
    candidate = f"ft-{now:%Y%m%d-%H%M%S}-{run_id}"
    workdir = training_workdir(models_dir, candidate)
    adapters = _prepare_adapters(base, config.adapters, models_dir)
    train_config = replace(config.train, lock_text=_text_locked(base))
    if adapters is not None:
        towers = adapters["settings"]["towers"]
        # the trunks that carry adapters stay frozen around them
        frozen = set(towers) | ({"text", "image"} if config.freeze_unadapted else set())
        train_config = replace(train_config, lock_text=train_config.lock_text or "text" in frozen,
                               lock_image=train_config.lock_image or "image" in frozen)
        metrics["adapters"] = {k: v for k, v in adapters.items() if k != "modules"} | {"modules": len(adapters["modules"])}
    result = train_contrastive(base.model, base.tokenizer, data, train_config, workdir=workdir, device=device,
                               progress=progress)
    metrics["training"] = result.to_dict()

    serving_embedder = load_embedder(spec, device=device, models_dir=models_dir)
    candidate_embedder = wrap_open_clip(base.model, base.preprocess, base.tokenizer, name=candidate, device=device)
    gate = gate_candidate(serving_embedder, candidate_embedder, later, products, config,
                          trained_on=frozenset((p.kind, p.query) for p in mined.pairs))
    metrics["gate"] = gate
    if not gate["promote"]:
        shutil.rmtree(workdir, ignore_errors=True)
        return RetrainOutcome(run_id, "succeeded", "rejected", serving, candidate, metrics=metrics, reason=gate["why"])
    current = store.active_index_version()
    if current is None or current.index_version != active.index_version:
        # Activated while this run trained, by an operator (a rollback) or another run: theirs
        # stands, and the candidate, judged against a version no longer served, is not written.
        shutil.rmtree(workdir, ignore_errors=True)
        return RetrainOutcome(run_id, "succeeded", "superseded", serving, candidate, metrics=metrics,
                              reason=_superseded(active, current))

    info = {
        "base": {"parent": serving, "arch": base.arch},
        "data": {"window": data_window, "pairs": len(mined.pairs), "items": mix},
        "hyper_parameters": asdict(train_config),
        "training": metrics["training"],
        "metrics": {"gate": gate},
        "training_run": run_id,
    }
    with pending_candidate(models_dir, candidate):
        if adapters is not None and adapters["base_version"] is not None:
            info["base"]["adapters_on"] = adapters["base_version"]
            write_adapter_version(models_dir, candidate, base.model, arch=base.arch, config=base.config,
                                  adapters={**adapters["settings"], "modules": adapters["modules"]},
                                  base_version=adapters["base_version"], trained=trainable_names(base.model),
                                  info=info, store=store, parent=serving)
        else:
            if has_adapters(base.model):
                merge_adapters(base.model)
            write_model_version(models_dir, candidate, base.model, arch=base.arch, config=base.config, info=info,
                                store=store, parent=serving)
    shutil.rmtree(workdir, ignore_errors=True)
    # The index is built from the saved version (what servers will load), then activated at once,
    # at the precision the serving index was built at: a promotion does not change it.
    embedder = load_embedder(candidate, device=device, models_dir=models_dir,
                             precision=str(active.manifest.get("precision", "fp32")))
    summary = CatalogIndexer(home=home, store=store, embedder=embedder,
                             options=replace(index_options, activate=False)).run(None)
    if config.promotion == "canary":
        return _start_canary(store, run_id, active, config, serving, candidate, summary.index_version, metrics)
    try:
        store.activate_index_version(summary.index_version, expected_active=active.index_version)
    except ActiveVersionChangedError:
        # Activated while the candidate's index was built: that activation stands. The
        # candidate's model and index versions stay, for `prism models activate` to serve.
        reason = (_superseded(active, store.active_index_version())
                  + f"; the candidate is kept: `prism models activate {summary.index_version}` serves it")
        log.warning("not promoting %s: %s", candidate, reason)
        return RetrainOutcome(run_id, "succeeded", "superseded", serving, candidate, summary.index_version, metrics,
                              reason=reason)
    log.info("promoted %s (index version %s)", candidate, summary.index_version)
    return RetrainOutcome(run_id, "succeeded", "promoted", serving, candidate, summary.index_version, metrics)


def _start_canary(store, run_id, active, config, serving, candidate, index_version, metrics) -> RetrainOutcome:
    """End the run in a canary of the candidate against the version the run started from."""
    kept = f"the candidate is kept: `prism models canary {index_version}` or `prism models activate {index_version}`"
    try:
        canary = start_canary(store, index_version, config.canary_fraction, policy=config.canary,
                              started_by="retrain", training_run_id=run_id, expected_serving=active.index_version)
    except ActiveVersionChangedError:
        reason = _superseded(active, store.active_index_version()) + f"; {kept}"
        return RetrainOutcome(run_id, "succeeded", "superseded", serving, candidate, index_version, metrics, reason=reason)
    except CanaryConflictError as exc:
        return RetrainOutcome(run_id, "succeeded", "superseded", serving, candidate, index_version, metrics,
                              reason=f"{exc}; {kept}")
    metrics["canary"] = {"id": canary.id, "event": "started", "fraction": canary.fraction,
                         "candidate_index_version": index_version, "policy": canary.policy}
    log.info("canary %d started for %s (index version %s)", canary.id, candidate, index_version)
    return RetrainOutcome(run_id, "succeeded", "canary", serving, candidate, index_version, metrics)


def _superseded(started_from: IndexVersionRecord, active_now: IndexVersionRecord | None) -> str:
    now = f"index version {active_now.index_version}" if active_now is not None else "no index version"
    return (f"{now} was activated while the run worked from {started_from.index_version}; "
            "that activation stands and the candidate is not promoted")


def _prepare_adapters(base, settings: AdapterSettings | None, models_dir: Path) -> dict | None:
    """Put the run's LoRA adapters on `base.model` and say where the candidate will point.

    Returns None for a fine-tune of the weights themselves (`settings` None; an adapter version
    serving is merged first), else {"settings", "modules", "base_version"}: a full Prism model
    version serving gets fresh adapters over itself; an adapter version serving keeps training
    its own adapters over the same base (its rank and targets, whatever `settings` say now), so
    a candidate never stacks adapters on adapters. A pretrained spec (no model version on disk
    to point at) trains adapters all the same, and its candidate is written whole
    (`base_version` None).
    """
    if base.adapters is not None:
        if settings is None:
            merge_adapters(base.model)
            return None
        kept = AdapterSettings.from_dict(base.adapters["adapter"])
        if kept != settings:
            log.info("the serving adapter version's adapters (%s) keep training; PRISM_RETRAIN_ADAPTER_* settings "
                     "apply to the next fresh base", kept)
        return {"settings": kept.to_dict(), "modules": list(base.adapters["adapter"]["modules"]),
                "base_version": base.adapters["base_model"]["version"]}
    if settings is None:
        return None
    modules = add_adapters(base.model, settings)
    on_disk = read_model_json(models_dir, base.name) is not None
    return {"settings": settings.to_dict(), "modules": modules, "base_version": base.name if on_disk else None}


def _text_locked(base) -> bool:
    """Keep the text trunk as the serving model had it: a LiT-style model's text stays locked."""
    text = getattr(base.model, "text", None)
    return bool(text is not None and base.config.get("text_cfg", {}).get("hf_model_name"))


def click_queries(pairs: list[ClickPair], judged_by: list[ClickPair] | None = None) -> list[ClickQuery]:
    """The queries of `pairs`, weighted by their clicks' inverse propensities.

    Relevant products are those clicked for the query in `pairs`, plus, with `judged_by`, every
    product trusted as a click answer to the same query anywhere in the window. Clicks only ever
    land on what the serving model showed: with one click per search, a second, equally right
    product (another size, another colour) would otherwise count against any model that ranks
    it first, and the gate would favour the serving model for having made the log.
    """
    relevant: dict[tuple[str, str], set[str]] = {}
    weight: dict[tuple[str, str], float] = {}
    for p in pairs:
        relevant.setdefault((p.kind, p.query), set()).add(p.product_id)
        weight[(p.kind, p.query)] = weight.get((p.kind, p.query), 0.0) + p.weight
    for p in judged_by or ():
        if (p.kind, p.query) in relevant:
            relevant[(p.kind, p.query)].add(p.product_id)
    return [ClickQuery(kind, query, frozenset(ids), weight[(kind, query)]) for (kind, query), ids in sorted(relevant.items())]


def _without_identifier_queries(pairs: list[ClickPair], store: Store) -> list[ClickPair]:
    """The pairs whose query is not a product id, GTIN or SKU: search pins those products first
    whatever the model says, and teaching a text tower digit strings costs capacity for nothing."""
    identifiers = {q for q in {p.query for p in pairs if p.kind == "text"} if store.identifier_rows(q, limit=1)}
    return [p for p in pairs if not (p.kind == "text" and p.query in identifiers)]


def _training_data(pairs: list[ClickPair], products: dict[str, ProductRecord], config: RetrainConfig,
                   text_fields: tuple[str, ...]):
    """Click items (the query's words on the clicked image), their hard negatives, and catalog anchors.
    Product texts join `text_fields` (PRISM_TEXT_FIELDS), as the index embeds them.

    A "more like this" click becomes (clicked image, the query product's text): the query
    product's own catalog item ties that text to its image, so the two images are pulled together.
    Items that share a query share a group, so with `group_batches` skipped results are in-batch
    negatives of the clicked one.
    """
    ids, images, texts, groups, weights = [], [], [], [], []
    usable = [p for p in pairs if p.product_id in products and (p.kind == "text" or p.query in products)]
    mean_weight = float(np.mean([p.weight for p in usable])) if usable else 1.0
    for n, pair in enumerate(usable):
        query_text = pair.query if pair.kind == "text" else product_text(products[pair.query], text_fields)
        group = f"{pair.kind}:{pair.query}"
        clicked = products[pair.product_id]
        ids.append(f"click:{n}:{clicked.product_id}")
        images.append(clicked.image_uri)
        texts.append([query_text])
        groups.append(group)
        weights.append(pair.weight / mean_weight)
        for neg_id in pair.hard_negatives:
            neg = products.get(neg_id)
            if neg is None:
                continue
            ids.append(f"negative:{n}:{neg_id}")
            images.append(neg.image_uri)
            texts.append([product_text(neg, text_fields)])
            groups.append(group)
            weights.append(1.0)
    clicks = len(ids)
    mix = min(max(config.catalog_mix, 0.0), 0.95)
    want = round(clicks * mix / (1 - mix)) if mix else 0
    pool = sorted(products)
    anchors = random.Random(config.seed).sample(pool, min(want, len(pool)))
    for product_id in anchors:
        p = products[product_id]
        ids.append(f"catalog:{product_id}")
        images.append(p.image_uri)
        texts.append(list(dict.fromkeys([p.title, product_text(p, text_fields)])))
        groups.append(f"catalog:{product_id}")
        weights.append(1.0)
    data = PairData(item_ids=ids, images=images, texts=texts, groups=groups, weights=weights)
    return data, {"click_items": clicks, "catalog_items": len(anchors), "click_pairs_used": len(usable)}


def gate_evidence(events, config: RetrainConfig) -> tuple[list, list[ClickQuery], datetime | None]:
    """Split the window's events by time: (the earlier events, which train; the later slice's
    queries, judged by later clicks alone (`later_click_queries`); the cut)."""
    train_events, later_events, cut = split_by_time(events, config.gate.holdout_fraction)
    return train_events, later_click_queries(later_events, config.mining), cut


def later_click_queries(later_events, mining: MiningConfig) -> list[ClickQuery]:
    """The gate's queries: the later slice's clicked queries, judged by the later slice alone.

    Every product clicked for a query anywhere in the later searches counts as relevant to it
    (one search shows only what the serving model ranked, so a second right product another
    search revealed must not count against a model that ranks it first). Clicks of the training
    window never judge: a candidate trained on them would be rewarded for memorising head
    queries, not for ranking what later shoppers wanted.
    """
    pairs = mine_pairs(later_events, replace(mining, min_clicks=1, hard_negatives_per_pair=0)).pairs
    return click_queries(pairs)


def bootstrap_lift(serving: np.ndarray, candidate: np.ndarray, weights: np.ndarray, *, level: float,
                   resamples: int, seed: int) -> dict:
    """The weighted mean of candidate - serving per query, and its percentile bootstrap interval:
    queries are resampled with replacement (`resamples` times, seeded), each resample's lift is
    the weighted mean over the drawn queries."""
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(serving, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    n = len(diff)
    if n == 0:
        return {"queries": 0, "lift": 0.0, "ci_low": 0.0, "ci_high": 0.0, "level": level, "resamples": 0}
    lift = float(np.average(diff, weights=w))
    draws = np.random.default_rng(seed).integers(0, n, size=(max(1, resamples), n))
    lifts = (diff[draws] * w[draws]).sum(axis=1) / w[draws].sum(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(lifts, [tail, 100.0 - tail])
    return {"queries": n, "lift": round(lift, 4), "ci_low": round(float(low), 4), "ci_high": round(float(high), 4),
            "level": level, "resamples": int(max(1, resamples))}


def gate_candidate(serving, candidate, later: list[ClickQuery], products: dict[str, ProductRecord], config: RetrainConfig,
                   *, trained_on: frozenset[tuple[str, str]] = frozenset()) -> dict:
    """Score both embedders on the later clicks and on catalog self-retrieval; decide promotion.

    The decision: the lower bound of the bootstrap interval of the MRR lift on later clicks is
    above `min_mrr_gain` (0: better with `ci_level` confidence), and catalog title -> image
    recall@1 drops by at most `max_catalog_recall_drop`. `trained_on` ((kind, query) of the
    training pairs) splits the later queries into slices: ones the candidate saw clicks for, and
    new ones; each slice is reported with its query count and lift, the decision uses all.
    """
    gate = config.gate
    rng = random.Random(config.seed)
    needed = {pid for q in later for pid in q.relevant} | {q.query for q in later if q.kind == "product"}
    rest = sorted(set(products) - needed)
    gallery_ids = sorted(needed & set(products)) + rng.sample(rest, max(0, min(len(rest), gate.gallery_max - len(needed))))
    catalog_sample = rng.sample(gallery_ids, min(gate.catalog_queries, len(gallery_ids)))
    scores, per_query = {}, {}
    usable: list[ClickQuery] = []
    for name, embedder in (("serving", serving), ("candidate", candidate)):
        vectors = embed_images(embedder, [products[pid].image_uri for pid in gallery_ids], batch_size=256)
        later_scores, usable, per_query[name] = _score_later(embedder, later, gallery_ids, vectors)
        scores[name] = {"later_clicks": later_scores,
                        "catalog": _score_catalog(embedder, catalog_sample, products, gallery_ids, vectors)}
    s, c = scores["serving"], scores["candidate"]
    weights = np.asarray([q.weight for q in usable])
    seen = np.asarray([(q.kind, q.query) in trained_on for q in usable], dtype=bool)
    slices = {}
    for slice_name, mask in (("all", np.ones(len(usable), dtype=bool)), ("seen_in_training", seen), ("new", ~seen)):
        lift = bootstrap_lift(per_query["serving"][mask], per_query["candidate"][mask], weights[mask],
                              level=gate.ci_level, resamples=gate.bootstrap_resamples, seed=config.seed)
        slices[slice_name] = {
            **lift,
            "serving_mrr": round(float(np.average(per_query["serving"][mask], weights=weights[mask])), 4) if mask.any() else 0.0,
            "candidate_mrr": round(float(np.average(per_query["candidate"][mask], weights=weights[mask])), 4) if mask.any() else 0.0,
        }
    lift = slices["all"]
    promote, why, recall_drop = gate_decision(lift, s["catalog"], c["catalog"], gate)
    return {"serving": s, "candidate": c, "mrr_gain": lift["lift"], "lift": lift, "slices": slices,
            "catalog_recall_drop": recall_drop, "catalog_metric": "recall@1",
            "gallery": len(gallery_ids), "promote": promote, "why": why}


def gate_decision(lift: dict, serving_catalog: dict, candidate_catalog: dict, gate: GateConfig) -> tuple[bool, str, float]:
    """(promote, why, catalog recall@1 drop) from the lift on later clicks (`bootstrap_lift`) and
    both models' catalog self-retrieval scores."""
    recall_drop = round(serving_catalog["recall@1"] - candidate_catalog["recall@1"], 4)
    ci = f"{lift['level']:.0%} CI [{lift['ci_low']:+.4f}, {lift['ci_high']:+.4f}] over {lift['queries']} queries"
    confident = lift["queries"] > 0 and lift["ci_low"] > gate.min_mrr_gain
    promote = confident and recall_drop <= gate.max_catalog_recall_drop + 1e-9
    if promote:
        why = f"MRR on later clicks {lift['lift']:+.4f} ({ci}); catalog recall@1 change {-recall_drop:+.4f}"
    elif not confident:
        why = (f"MRR on later clicks {lift['lift']:+.4f} ({ci}): the interval's lower bound is not above "
               f"{gate.min_mrr_gain:+.4f}")
    else:
        why = f"catalog recall@1 dropped by {recall_drop:.4f}, more than the allowed {gate.max_catalog_recall_drop}"
    return promote, why, recall_drop


def _score_later(embedder, later: list[ClickQuery], gallery_ids: list[str],
                 gallery: np.ndarray) -> tuple[dict, list[ClickQuery], np.ndarray]:
    """The summary scores, the queries scored (those whose relevant products are in the gallery)
    and each one's reciprocal rank, for the bootstrap."""
    position = {pid: i for i, pid in enumerate(gallery_ids)}
    usable = [q for q in later if (q.kind == "text" or q.query in position) and any(p in position for p in q.relevant)]
    if not usable:
        return {"queries": 0, "recall@10": 0.0, "mrr": 0.0, "ndcg@10": 0.0}, [], np.zeros(0)
    text_queries = [q for q in usable if q.kind == "text"]
    vectors = {}
    if text_queries:
        for q, v in zip(text_queries, embedder.encode_texts([q.query for q in text_queries])):
            vectors[q] = v
    for q in usable:
        if q.kind == "product":
            vectors[q] = gallery[position[q.query]]
    query_matrix = np.stack([vectors[q] for q in usable])
    similarity = query_matrix @ gallery.T
    relevant = np.zeros_like(similarity, dtype=bool)
    for i, q in enumerate(usable):
        for pid in q.relevant:
            if pid in position:
                relevant[i, position[pid]] = True
        if q.kind == "product":
            similarity[i, position[q.query]] = -np.inf  # the query product itself is not an answer
    # Clicks come from the serving model's own ranking, and mostly from its top: weighing each
    # query by the inverse propensity of its clicks (as in mining) counters that bias towards it.
    weights = np.asarray([q.weight for q in usable])
    ranks = first_relevant_ranks(similarity, relevant)
    reciprocal = 1.0 / ranks
    return ({"queries": len(usable), "recall@10": round(float(np.average(ranks <= 10, weights=weights)), 4),
             "mrr": round(float(np.average(reciprocal, weights=weights)), 4),
             "ndcg@10": ndcg_at(similarity, relevant, weights=weights)}, usable, reciprocal)


def _score_catalog(embedder, sample: list[str], products, gallery_ids: list[str], gallery: np.ndarray) -> dict:
    titles = [normalise_query(products[pid].title) for pid in sample]
    gallery_titles = np.asarray([normalise_query(products[pid].title) for pid in gallery_ids])
    relevant = np.asarray(titles)[:, None] == gallery_titles[None, :]
    similarity = embedder.encode_texts([products[pid].title for pid in sample]) @ gallery.T
    ranks = rank_metrics(similarity, relevant, ks=(1, 10))
    return {"queries": len(sample), "recall@1": ranks.at(1), "recall@10": ranks.at(10), "mrr": ranks.mrr}
