"""The `prism` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prism: cross-modal product search.")
models_app = typer.Typer(no_args_is_help=True, help="Model and index versions.")
app.add_typer(models_app, name="models")
products_app = typer.Typer(
    no_args_is_help=True,
    help="One catalog product: show, change or delete it (works on PRISM_HOME directly; no server needed)."
)
app.add_typer(products_app, name="products")

# `--help` on a pipe: wide enough that no option name is cut (the widest needs about 105 columns).
HELP_WIDTH = 120
# Tables on a pipe: their natural width, whatever it is.
PIPE_WIDTH = 1_000_000


def _settings(**overrides):
    from pydantic import ValidationError

    from api.settings import PrismSettings

    try:
        return PrismSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:  # a bad PRISM_* value or prism.toml entry: pydantic names the field
        _fail("invalid setting: " + "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        ))


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _console():
    """The console for stdout. On a pipe or in a file, tables keep their natural width: that output
    is parsed and copied from (version ids), and rich's 80-column default for non-terminals cut
    exactly that. An explicit COLUMNS still wins, as it does everywhere in rich."""
    from rich.console import Console

    console = Console()
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console
    return Console(width=PIPE_WIDTH)


def _table(*columns: str, **options):
    """A table whose cells wrap rather than end in "…". A cut cell loses characters; CJK titles have
    no spaces to wrap at, so rich's default overflow (ellipsis) cut them mid-title."""
    from rich.table import Table

    table = Table(**options)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _row(table, *values) -> None:
    # Catalog text as Text, never as markup: a title like "[b]Sale[/b]" or ":apple:" prints as it
    # is instead of being styled, turned into an emoji, or refused as broken markup.
    from rich.text import Text

    table.add_row(*(Text("" if v is None else str(v)) for v in values))


def _known_errors() -> tuple[type[BaseException], ...]:
    from embedder import ImageDecodeError, ModelSpecError, ModelUnavailableError
    from feedback import TrainingError
    from indexer import CatalogError, DemoCatalogError, IndexVersionError, VectorsFileError
    from search import NotReadyError, QueryError
    from store import StoreError

    return (
        CatalogError,
        VectorsFileError,
        DemoCatalogError,
        TrainingError,
        ModelSpecError,
        ModelUnavailableError,
        QueryError,
        NotReadyError,
        ImageDecodeError,
        StoreError,
        IndexVersionError,
        ImportError,
    )


class _RichProgress:
    def __init__(self, progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def start(self, stage: str, total: int | None) -> None:
        self.tasks[stage] = self.progress.add_task(stage, total=total)

    def advance(self, stage: str, n: int = 1) -> None:
        self.progress.advance(self.tasks[stage], n)

    def finish(self, stage: str) -> None:
        task = self.tasks[stage]
        total = self.progress.tasks[task].total
        if total is None:
            self.progress.update(task, total=self.progress.tasks[task].completed)


@app.command()
def index(
    catalog: Annotated[Path, typer.Argument(help="catalog file: .csv, .parquet or .jsonl")],
    # Typer has no option with an optional value: `--ray [ADDRESS]` is a flag and an optional argument.
    ray_address: Annotated[Optional[str], typer.Argument(
        metavar="ADDRESS", show_default=False,
        help="with --ray: the cluster, HOST:PORT or ray://HOST:PORT (default auto: RAY_ADDRESS, or the cluster "
             "`ray start` made on this host)")] = None,
    model: Annotated[Optional[str], typer.Option(help="model spec, e.g. ViT-B-32:laion2b_s34b_b79k")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, max=4096, help="images per forward pass")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda")] = None,
    allow_url_images: Annotated[bool, typer.Option(help="fetch http(s) image URLs (public hosts only)")] = False,
    image_root: Annotated[Optional[Path], typer.Option(help="local images must lie inside this folder")] = None,
    vectors: Annotated[Optional[Path], typer.Option(
        help="Parquet file of vectors made elsewhere by --model (product_id, image_vector and/or text_vector): "
             "nothing is embedded here. One image vector per product: its further catalog `images` are indexed "
             "only if an earlier run without --vectors embedded them with this model (the summary counts the "
             "others as left out)")] = None,
    prefer: Annotated[Literal["newer", "file", "api"], typer.Option(
        help="a product edited over the API since this file was written: the newer change wins (by the "
             "file's modification time), or always the file, or always the API edit")] = "newer",
    report: Annotated[Optional[Path], typer.Option(
        help="write the whole summary as JSON here, with every rejected row and every product whose "
             "image failed")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    sync: Annotated[bool, typer.Option(
        "--sync", help="after indexing, delete the live products CATALOG does not list (journaled, as `prism "
                       "products delete`); rows rejected for a bad field still keep their product")] = False,
    max_delete_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="with --sync: if more than this share of the live catalog would be deleted, "
                               "delete nothing and exit 1")] = 0.2,
    ray: Annotated[bool, typer.Option(
        "--ray", help="embed on a Ray cluster (`--ray [ADDRESS]`). Every node needs Prism installed and the "
                      "home's models/ and the images at the same paths (a shared filesystem). Embeds each "
                      "product's first image: further catalog `images` are indexed only if this model embedded "
                      "them before (the summary counts the others as left out)")] = False,
    ray_actors: Annotated[Optional[int], typer.Option(
        min=1, help="with --ray: model replicas (default: one per GPU; without GPUs, the cluster's CPUs divided "
                    "by --ray-cpus-per-actor)")] = None,
    ray_cpus_per_actor: Annotated[float, typer.Option(
        min=0.01, help="with --ray on a cluster without GPUs: CPUs (and torch threads) per model replica")] = 1.0,
    precision: Annotated[Optional[Literal["fp32", "bf16", "int8"]], typer.Option(
        help="encoder precision to embed at (default PRISM_ENCODER_PRECISION, fp32): int8 quantises the Linear "
             "weights, bf16 runs only where the CPU has native bf16 kernels (else fp32, said in the log); the "
             "index records it and queries to it are encoded at it")] = None,
) -> None:
    """Ingest CATALOG, embed what changed (or take --vectors), build and activate a new index version.

    Without --model, a home keeps embedding with the model of its active index version. With --ray the
    embedding runs on a Ray cluster; this process still reads the catalog, writes the vectors and builds."""
    from indexer.ray_embed import RayEmbedError, RayOptions

    settings = _settings(
        model=model, batch_size=batch_size, device=device, image_root=image_root,
        allow_url_images=allow_url_images or None, encoder_precision=precision,
    )
    ray_options = None
    if vectors is not None and precision not in (None, "fp32"):
        _fail("--vectors embeds nothing here, --precision says how to embed: give one of them")
    if ray_address is not None and not ray:
        _fail(f"unexpected argument {ray_address!r} (a cluster address goes with --ray: --ray {ray_address})")
    if ray:
        if vectors is not None:
            _fail("--vectors embeds nothing, --ray says where to embed: give one of them")
        try:
            ray_options = RayOptions(address=ray_address or "auto", actors=ray_actors, cpus_per_actor=ray_cpus_per_actor,
                                     models_dir=settings.models_dir)
        except ValueError as exc:
            _fail(str(exc))
    if max_delete_fraction != 0.2 and not sync:
        _fail("--max-delete-fraction goes with --sync")
    try:
        summary, store = _run_index(settings, catalog, vectors=vectors, prefer=prefer, quiet=as_json, ray=ray_options,
                                    sync=sync, max_delete_fraction=max_delete_fraction)
        if report is not None:
            _write_report(report, summary, store)
    except KeyboardInterrupt:
        _fail("interrupted; finished batches are kept: run the same command again to resume", 130)
    except RayEmbedError as exc:
        _fail(str(exc))
    except _known_errors() as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write the report: {exc}")
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False))
    else:
        _print_summary(summary, report)
    if summary.sync is not None and summary.sync["refused"]:
        _fail(f"--sync deleted nothing: {summary.sync['reason']}", 1)


def _write_report(path: Path, summary, store) -> None:
    """The summary with every failing product (from SQL, so none is left out however many there
    are), written atomically."""
    body = summary.to_dict()
    body["failed_images"] = [
        {"product_id": pid, "reason": status, "message": error or ""} for pid, status, error in store.iter_image_failures()
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2, ensure_ascii=False))
    tmp.replace(path)


def _run_index(settings, catalog: Path, *, vectors: Path | None = None, prefer: str = "newer", quiet: bool, ray=None,
               sync: bool = False, max_delete_fraction: float = 0.2):
    from dataclasses import replace

    from embedder import describe_model, load_embedder
    from indexer import CatalogIndexer, index_model_spec, read_catalog, read_vectors_file

    from store import SourcePreference, Store

    options = replace(settings.index_options(), prefer=SourcePreference(prefer), sync=sync,
                      max_delete_fraction=max_delete_fraction)
    # An unreadable catalog (missing, unknown format, no required columns) or vectors file fails
    # before the model load, which takes seconds to minutes.
    next(iter(read_catalog(catalog, options.image_policy)), None)
    if vectors is not None:
        read_vectors_file(vectors, dim=None)
    if ray is not None:
        from indexer.ray_embed import check_reachable

        check_reachable(ray.address)
    settings.apply_threads()
    store = Store.open(settings.db_url, lexical=settings.lexical())
    spec = index_model_spec(store, settings.model)
    if vectors is not None:  # nothing is embedded: the model's name and width are all the run needs
        embedder = describe_model(spec, models_dir=settings.models_dir)
    else:
        embedder = load_embedder(
            spec,
            device=settings.device,
            models_dir=settings.models_dir,
            workers=settings.decode_workers,
            image_limits=settings.image_limits(),
            precision=settings.encoder_precision,
        )
    with _progress_bar(quiet, log_every_s=settings.progress_log_s) as progress:
        indexer = CatalogIndexer(
            home=settings.artifacts, store=store, embedder=embedder, options=options, progress=_RichProgress(progress)
        )
        return indexer.run(catalog, vectors=vectors, ray=ray), store


def _print_summary(summary, report: Path | None = None) -> None:
    console = _console()
    table = _table("", "", title="prism index", show_header=False)
    table.add_row("rows read", str(summary.rows_read))
    table.add_row("rows rejected", str(summary.rows_rejected))
    table.add_row("products written", f"{summary.products_upserted} (+{summary.products_unchanged} unchanged)")
    table.add_row("products indexed", str(summary.products_indexed))
    table.add_row("images embedded", f"{summary.images_embedded} (+{summary.images_cached} from cache)")
    table.add_row("texts embedded", f"{summary.texts_embedded} (+{summary.texts_cached} from cache)")
    if summary.images_supplied or summary.texts_supplied:
        table.add_row("vectors supplied", f"{summary.images_supplied} image, {summary.texts_supplied} text (new)")
    if summary.further_images_left_out:
        table.add_row("further images left out", f"{summary.further_images_left_out} (not embedded with this model: "
                      "--vectors carries one image per product, --ray embeds first images; run without them to add)")
    failures = ", ".join(f"{k}: {v}" for k, v in sorted(summary.image_failures.items())) or "none"
    table.add_row("image failures", failures)
    for modality, info in summary.indexes.items():
        table.add_row(
            f"{modality} index",
            f"{info['factory']}  n={info['count']}  nprobe={info['nprobe']}  recall@10={info['recall_at_10']:.3f}",
        )
    if summary.sync is not None:
        sync = summary.sync
        share = f"{sync['absent']} of {sync['live_before']} live products ({sync['fraction']:.1%})"
        table.add_row("sync", f"refused: {share} absent from the feed; deleted 0" if sync["refused"]
                      else f"deleted {sync['deleted']}: {share} absent from the feed")
    table.add_row("model version", str(summary.model_version))
    table.add_row("index version", str(summary.index_version))
    table.add_row("seconds", f"{summary.seconds:.1f}")
    console.print(table)
    everything = f"all in {report}" if report else "--report FILE lists all"
    for err in summary.row_errors[:20]:
        console.print(f"  line {err.line}: {err.product_id or '?'}: {err.reason}", style="yellow", markup=False)
    if summary.rows_rejected > 20:
        console.print(f"  ... and {summary.rows_rejected - 20} more rejected rows ({everything})", style="yellow")
    failed = sum(summary.image_failures.values())
    if failed:
        console.print(f"products whose image failed (indexed by their text only): {failed}", style="yellow")
    for f in summary.failed_images[:20]:
        console.print(f"  {f['product_id']}: {f['reason']}: {f['message']}", style="yellow", markup=False)
    if failed > 20:
        console.print(f"  ... and {failed - 20} more ({everything})", style="yellow")
    if summary.api_edits_kept:
        ids = ", ".join(summary.api_edits_kept_ids[:20]) + (", ..." if summary.api_edits_kept > 20 else "")
        console.print(f"API edits newer than the file, kept: {summary.api_edits_kept} ({ids}); "
                      "--prefer file overwrites them", style="yellow", markup=False)
    if summary.api_edits_overwritten:
        console.print(f"API edits overwritten by the file: {summary.api_edits_overwritten}", markup=False)


@app.command()
def search(
    text: Annotated[Optional[str], typer.Argument(help="text query")] = None,
    image: Annotated[Optional[Path], typer.Option(help="image file to search with")] = None,
    target: Annotated[str, typer.Option(help="image, text or hybrid")] = "image",
    k: Annotated[int, typer.Option("-k", "--k", help="results to return")] = 10,
    offset: Annotated[int, typer.Option(help="results to skip (paging)")] = 0,
    category: Annotated[Optional[list[str]], typer.Option(help="only this category (repeatable)")] = None,
    brand: Annotated[Optional[list[str]], typer.Option(help="only this brand (repeatable)")] = None,
    price_min: Annotated[Optional[float], typer.Option(help="minimum price")] = None,
    price_max: Annotated[Optional[float], typer.Option(help="maximum price")] = None,
    attr: Annotated[Optional[list[str]], typer.Option(
        help="only products whose attribute NAME is VALUE: NAME=VALUE (repeatable; one name given twice: either "
             "value), or NAME=MIN..MAX for a numeric range (either end may be left out)")] = None,
    in_stock: Annotated[Optional[bool], typer.Option(
        "--in-stock/--out-of-stock", help="leave out products known to be out of stock / only those", show_default=False)] = None,
    facets: Annotated[Optional[str], typer.Option(
        help="count values over every match: comma-separated category, brand, in_stock, attributes.NAME")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the answer as JSON, as POST /v1/search answers it")] = False,
) -> None:
    """Search the active index by TEXT or by --image."""
    if (text is None) == (image is None):
        _fail("give a text query or --image PATH (exactly one)")
    settings = _settings()
    # Everything the user typed is checked before the model loads (seconds to minutes): the image
    # file is read and decoded, and the arguments go through the request model of POST /v1/search.
    data = _read_query_image(settings, image) if image is not None else None
    request = _search_request(
        text=text, image=data, target=target, k=k, offset=offset,
        filters={"category": category or [], "brand": brand or [], "price_min": price_min, "price_max": price_max,
                 "attributes": _attr_options(attr or []), "in_stock": in_stock},
        facets=[part.strip() for part in facets.split(",") if part.strip()] if facets is not None else [],
    )
    from api.routes.common import to_filter
    from api.routes.search import logged_response
    from search import SearchEngine
    from store import Store

    try:
        store = Store.open(settings.db_url)
        engine = SearchEngine(
            store, indexes_dir=settings.indexes_dir, models_dir=settings.models_dir, device=settings.device,
            image_limits=settings.image_limits(),
        )
        settings.apply_threads()
        # No engine.refresh() first: search() checks the query (offset + k within the result
        # window, as for HTTP) before it loads the active version and its model.
        result = engine.search(
            text=request.text, image=request.image_b64, target=request.target, k=request.k, offset=request.offset,
            filters=to_filter(request.filters), facets=tuple(request.facets),
        )
        response = logged_response(store, result)
    except _known_errors() as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(response.model_dump(mode="json"), indent=2, ensure_ascii=False))
        return
    # took_ms includes loading the index version and its model, which a CLI run does every time
    # (a server once); say how much of it that was.
    loading = response.timings_ms.get("sync", 0.0)
    took = f"{response.took_ms:.0f} ms" + (f", {loading:.0f} of them loading" if loading >= 50 else "")
    # Which of a product's images matched, when a product has several: "1" is its first image.
    matched = any(hit.matched_image and "/images/" in hit.matched_image for hit in response.results)
    table = _table("rank", "score", "product_id", "title", "category", "price", *(["image"] if matched else []))
    for hit in response.results:
        price = "" if hit.price is None else f"{hit.price:.2f} {hit.currency or ''}".strip()
        image = [_image_number(hit.matched_image)] if matched else []
        _row(table, hit.rank, f"{hit.score:.4f}", hit.product_id, hit.title, hit.category, price, *image)
    console = _console()
    # A line of its own, not the table's title, which rich wraps to the table's width.
    console.print(f"{response.query_kind} -> {response.target.value}  ({took}; query {response.query_id})")
    console.print(table)
    for name, counts in (response.facets or {}).items():
        shown = ", ".join(f"{value} ({count})" for value, count in counts.items()) or "none"
        console.print(f"{name}: {shown}", markup=False)


def _image_number(url: str | None) -> str:
    """1-based number of the product image a hit's `matched_image` URL names ("" for none)."""
    if not url:
        return ""
    if "/images/" not in url:
        return "1"
    return str(int(url.rsplit("/images/", 1)[1].split("?", 1)[0]) + 1)


def _attr_options(options: list[str]) -> dict:
    """`--attr NAME=VALUE` / `NAME=MIN..MAX` as the `attributes` of POST /v1/search filters."""
    out: dict = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or not name:
            _fail(f"--attr {option!r}: give NAME=VALUE or NAME=MIN..MAX")
        low, dots, high = value.partition("..")
        if dots:
            try:
                out[name] = {key: float(v) for key, v in (("min", low), ("max", high)) if v.strip()}
            except ValueError:
                _fail(f"--attr {option!r}: a range is MIN..MAX, numbers")
            continue
        out.setdefault(name, []).append(value)
    return out


# The request model's field names as the CLI spells them, for its validation messages.
_SEARCH_ARGS = {
    "text": "TEXT", "image_b64": "--image", "target": "--target", "k": "-k", "offset": "--offset",
    "category": "--category", "brand": "--brand", "price_min": "--price-min", "price_max": "--price-max",
    "attributes": "--attr", "in_stock": "--in-stock", "facets": "--facets",
}


def _search_request(*, text: str | None, image: bytes | None, filters: dict, facets: list[str] | None = None, **fields):
    """The CLI's arguments as the SearchRequest of POST /v1/search: the same validators, so the CLI
    refuses exactly what HTTP answers with a 422. Its messages use the CLI's names."""
    import base64
    import re

    from pydantic import ValidationError

    from api.schemas import SearchRequest

    body = {"text": text, "filters": filters, "facets": facets or [], **fields}
    if image is not None:
        body["image_b64"] = base64.b64encode(image).decode("ascii")
    try:
        return SearchRequest.model_validate(body)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            names = [_SEARCH_ARGS[x] for x in e["loc"] if isinstance(x, str) and x in _SEARCH_ARGS]
            message = e["msg"].removeprefix("Value error, ")
            # A check across fields (price_min above price_max) names them in the message.
            message = re.sub(r"\b(price_min|price_max)\b", lambda m: _SEARCH_ARGS[m.group(1)], message)
            if names and names[-1] != "--image" and not isinstance(e.get("input"), dict):
                shown = repr(e.get("input"))
                message += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
            problems.append(f"{names[-1]}: {message}" if names else message)
        _fail("; ".join(problems))


def _read_query_image(settings, path: Path) -> bytes:
    """The query image's bytes, read within the upload limits and decoded once to prove it is an
    image: a missing, oversized or broken file is refused before the model loads."""
    from embedder import ImageDecodeError, decode_image, read_image_bytes

    limits = settings.image_limits()
    try:
        data = read_image_bytes(path, limits)
        decode_image(data, limits)
    except ImageDecodeError as exc:
        _fail(f"--image {path}: {exc}")
    return data


class LogLevel(str, Enum):
    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 for all)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="worker processes, each with its own model copy")] = 1,
    log_level: Annotated[LogLevel, typer.Option(help="server log level")] = LogLevel.info,
) -> None:
    """Serve the HTTP API and the search page at http://HOST:PORT/ (settings from PRISM_* / prism.toml)."""
    import os
    import tempfile

    import uvicorn

    try:
        settings = _settings()
    except Exception as exc:  # invalid PRISM_* values: pydantic names the field
        _fail(str(exc))
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Counters and histograms are summed over the workers only in multiprocess mode, which
        # must be chosen before any worker imports prometheus_client.
        metrics_dir = tempfile.mkdtemp(prefix="prism-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    typer.echo(f"Prism on http://{host}:{port}/  (home {settings.home.resolve()}, {workers} worker(s))", err=True)
    try:
        uvicorn.run(
            "api.app:create_app", factory=True, host=host, port=port, workers=workers, log_level=log_level.value,
        )
    finally:
        if metrics_dir is not None:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)


class _RichTrainProgress:
    """Training progress for the trainer's TrainProgress protocol: a bar with loss and throughput."""

    def __init__(self, progress):
        self.progress = progress
        self.task = None

    def start(self, total_steps: int, done_steps: int) -> None:
        self.task = self.progress.add_task("train", total=total_steps, completed=done_steps, loss=float("nan"), rate=0.0)

    def step(self, step: int, *, loss: float, images_per_s: float, temperature: float) -> None:
        self.progress.update(self.task, completed=step, loss=loss, rate=images_per_s)

    def epoch(self, epoch: int, *, mean_loss: float) -> None:
        self.progress.update(self.task, description=f"train (epoch {epoch})")

    def finish(self) -> None:
        pass


def _progress_bar(quiet: bool = False, *, train: bool = False, log_every_s: float = 30.0):
    """Bars on a terminal. Elsewhere rich draws a bar only when it ends, so a two-hour job would
    show nothing in its log: there each unfinished stage also prints a plain line every log_every_s."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if train:
        columns += [TimeRemainingColumn(), TextColumn("loss {task.fields[loss]:.3f}  {task.fields[rate]:.0f} img/s")]
    console = Console(stderr=True)
    progress = Progress(*columns, console=console, disable=quiet)
    if quiet or console.is_terminal:
        return progress
    return _ProgressLines(progress, log_every_s)


class _ProgressLines:
    """A rich Progress that also prints one line per unfinished task every `every_s` seconds."""

    def __init__(self, progress, every_s: float) -> None:
        import threading

        self.progress = progress
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-lines", daemon=True)

    def __enter__(self):
        self.progress.__enter__()
        self._thread.start()
        return self.progress

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        return self.progress.__exit__(*exc_info)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for task in list(self.progress.tasks):
                if not task.finished:
                    self.progress.console.print(_progress_line(task), markup=False, highlight=False, soft_wrap=True)


def _progress_line(task) -> str:
    import time

    done = f"{task.completed:,.0f}" + (f"/{task.total:,.0f} ({task.percentage:.0f}%)" if task.total else "")
    line = f"{time.strftime('%H:%M:%S')} {task.description}: {done}, {_duration(task.elapsed or 0)} elapsed"
    if task.time_remaining is not None:
        line += f", ~{_duration(task.time_remaining)} left"
    if "loss" in task.fields:
        line += f", loss {task.fields['loss']:.3f}, {task.fields.get('rate', 0):.0f} img/s"
    return line


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _build_demo_catalog(settings, *, limit: int | None = None, quiet: bool = False):
    from indexer import build_demo_catalog

    with _progress_bar(quiet, log_every_s=settings.progress_log_s) as progress:
        task = progress.add_task("demo catalog", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return build_demo_catalog(settings.home / "demo", limit=limit, progress=advance)


@app.command()
def demo(
    serve_page: Annotated[bool, typer.Option("--serve/--no-serve", help="serve the search page at the end")] = True,
    host: Annotated[str, typer.Option(help="interface to serve on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8000,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda")] = None,
    limit: Annotated[Optional[int], typer.Option(min=20, help="quick trial: only this many products")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, max=1000, help="quick trial: train this many epochs")] = None,
) -> None:
    """Build the OpenMoji demo catalog, train (or reuse) the demo model, index it, and serve the page."""
    import dataclasses

    from rich.console import Console

    from feedback import DEMO_TRAIN, DEMO_VERSION, ensure_demo_model, summarise
    from store import Store

    console = Console(stderr=True)
    try:
        settings = _settings(model=DEMO_VERSION, device=device)
        settings.apply_threads()
        catalog = _build_demo_catalog(settings, limit=limit)
        config = DEMO_TRAIN if epochs is None else dataclasses.replace(DEMO_TRAIN, epochs=epochs)
        dropped = ", ".join(f"{n} {why}" for why, n in catalog.stats["dropped"].items()) or "none"
        console.print(f"demo catalog: {len(catalog.products)} products from {catalog.stats['openmoji_glyphs']} "
                      f"OpenMoji glyphs (dropped: {dropped}); splits {catalog.stats['splits']}")
        store = Store.open(settings.db_url, lexical=settings.lexical())
        with _progress_bar(train=True, log_every_s=settings.progress_log_s) as progress:
            meta, trained = ensure_demo_model(
                catalog, models_dir=settings.models_dir, store=store, device=_device(settings.device),
                config=config, progress=_RichTrainProgress(progress),
            )
        how = f"trained in {meta['training']['seconds']:.0f} s" if trained else "reused"
        console.print(f"demo model ({how}); held-out test split: {summarise(meta['metrics']['test'])}")
        summary, _ = _run_index(settings, catalog.catalog, quiet=False)
    except KeyboardInterrupt:
        _fail("interrupted; finished work is kept: run `prism demo` again to resume", 130)
    except _known_errors() as exc:
        _fail(str(exc))
    console.print(f"indexed {summary.products_indexed} products as index version {summary.index_version}")
    console.print("Emoji images: OpenMoji (openmoji.org), CC BY-SA 4.0. Brands and prices are synthetic.")
    if serve_page:
        console.print(f"Open http://{host}:{port}/ and search e.g. 'pizza', 'dog', 'umbrella'.")
        serve(host=host, port=port, workers=1, log_level=LogLevel.warning)
    else:
        console.print("Serve it with `prism serve` (or `make serve`) and open http://127.0.0.1:8000/")


def _device(setting: str) -> str:
    from embedder import resolve_device

    return resolve_device(setting)


@app.command("eval")
def eval_models(
    model: Annotated[Optional[str], typer.Option(help="model version to evaluate (default: the serving one)")] = None,
    compare: Annotated[Optional[str], typer.Option(help="a second model version, shown side by side")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the reports as JSON")] = False,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda")] = None,
    precision: Annotated[Optional[Literal["bf16", "int8"]], typer.Option(
        help="evaluate the model at fp32 and at this precision side by side: the quality cost of serving it")] = None,
) -> None:
    """Recall@1/5/10 and MRR, text->image and image->text, on the demo catalog's held-out test split and in full;
    and one slice per PRISM_EVAL_LANGUAGE_FIELDS field the catalog has (e.g. its Chinese titles as queries)."""
    from embedder import load_embedder
    from feedback import evaluate_demo
    from indexer import load_demo_catalog
    from store import Store

    if compare and precision:
        _fail("--compare sets two models side by side, --precision one model at two precisions: give one")
    try:
        settings = _settings(device=device)
        settings.apply_threads()
        catalog = load_demo_catalog(settings.home / "demo")
        store = Store.open(settings.db_url)
        language_products = _language_products(store, settings.eval_languages())
        if catalog is None and not language_products:
            _fail(f"no demo catalog in {settings.home / 'demo'}: run `prism demo --no-serve` first "
                  f"(or index a catalog with one of PRISM_EVAL_LANGUAGE_FIELDS: {settings.eval_language_fields or 'none set'})")
        versions = [model or _serving_model(store)]
        if compare:
            if compare == versions[0]:
                _fail(f"--compare {compare} is the model being evaluated; name a different version")
            versions.append(compare)
        runs = [(version, version, None) for version in versions]
        if precision:
            runs.append((f"{versions[0]} ({precision})", versions[0], precision))
        reports, languages = {}, {}
        for label, version, at in runs:
            embedder = load_embedder(_model_spec(store, version), device=settings.device, models_dir=settings.models_dir,
                                     image_limits=settings.image_limits(), **({"precision": at} if at else {}))
            if at and embedder.precision != at:  # bf16 without native kernels
                from embedder import resolve_precision

                _fail(resolve_precision(at, embedder.device)[1])
            reports[label] = _with_precision(evaluate_demo(embedder, catalog), embedder) if catalog else {}
            languages[label] = _language_reports(embedder, language_products, settings.eval_languages())
    except _known_errors() as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({v: {**{k: r.to_dict() for k, r in sets.items()},
                                   **({"languages": languages[v]} if languages[v] else {})}
                               for v, sets in reports.items()}, indent=2, ensure_ascii=False))
        return
    if catalog is not None:
        _print_eval(reports)
    _print_language_slices(languages)


def _model_spec(store, version: str) -> str:
    """What loads a model version: its recorded spec (an open_clip model is recorded under a
    version name, e.g. prism-tiny-vit-random-s0, that is not itself a spec)."""
    record = store.get_model_version(version)
    return record.spec if record is not None else version


def _language_products(store, fields: tuple[str, ...]) -> list:
    """The live products with an image, when any has a value in one of `fields`; else none."""
    from store import text_field_values

    if not fields:
        return []
    products = [p for p in store.live_products() if p.image_status == "ok" and p.image_uri]
    return products if any(any(text_field_values(p, fields)) for p in products) else []


def _language_reports(embedder, products: list, fields: tuple[str, ...]) -> dict:
    from feedback import language_slices

    if not products:
        return {}
    return {f: s.to_dict() for f, s in language_slices(embedder, products, fields).items()}


def _print_language_slices(languages: dict) -> None:
    versions = list(languages)
    if not versions or not any(languages.values()):
        return
    table = _table("field", "queries", "gallery", "metric",
                   title="prism eval by language field (each distinct value a query; the products holding it its answers)")
    for v in versions:
        table.add_column(v, justify="right", overflow="fold")
    if len(versions) == 2:
        table.add_column("delta", justify="right")
    first = languages[versions[0]]
    for field_name, sl in first.items():
        for metric in ("@1", "@5", "@10", "mrr"):
            values = [languages[v][field_name]["scores"]["mrr"] if metric == "mrr"
                      else languages[v][field_name]["scores"]["recall"][metric] for v in versions]
            row = [field_name, str(sl["scores"]["queries"]), str(sl["gallery"]),
                   "MRR" if metric == "mrr" else f"recall{metric}", *(f"{x:.3f}" for x in values)]
            if len(values) == 2:
                row.append(f"{values[1] - values[0]:+.3f}")
            table.add_row(*row)
    _console().print(table)


def _with_precision(reports: dict, embedder) -> dict:
    for report in reports.values():
        report.extra["precision"] = embedder.precision
    return reports


def _serving_model(store) -> str:
    active = store.active_index_version()
    if active is None:
        _fail("no index version is serving; name one with --model VERSION")
    return active.model_version


def _print_eval(reports: dict) -> None:
    versions = list(reports)
    table = _table(
        "split", "direction", "metric",
        title="prism eval (gallery = the split's own products; skin-tone variants count as the same emoji)",
    )
    for v in versions:
        table.add_column(v, justify="right", overflow="fold")
    if len(versions) == 2:
        table.add_column("delta", justify="right")
    first = reports[versions[0]]
    for split in first:
        for direction, label in (("text_to_image", "text->image"), ("title_to_image", "title->image"),
                                 ("image_to_text", "image->text")):
            for metric in ("@1", "@5", "@10", "mrr"):
                values = []
                for v in versions:
                    scores = getattr(reports[v][split], direction)
                    values.append(scores.mrr if metric == "mrr" else scores.recall[metric])
                row = [split, label, "MRR" if metric == "mrr" else f"recall{metric}", *(f"{x:.3f}" for x in values)]
                if len(values) == 2:
                    row.append(f"{values[1] - values[0]:+.3f}")
                table.add_row(*row)
    _console().print(table)


@models_app.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List model versions and index versions (the active one marked)."""
    from store import Store

    settings = _settings()
    try:
        store = Store.open(settings.db_url)
        models = store.list_model_versions()
        versions = store.list_index_versions()
    except _known_errors() as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps({
            "models": [{"model_version": m.model_version, "spec": m.spec, "dim": m.dim} for m in models],
            "indexes": [
                {"index_version": v.index_version, "model_version": v.model_version, "active": v.is_active,
                 "created_at": v.created_at.isoformat(), "counts": v.manifest.get("counts", {})}
                for v in versions
            ],
        }, indent=2))
        return
    console = _console()
    mt = _table("model_version", "spec", "dim", title="model versions")
    for m in models:
        _row(mt, m.model_version, m.spec, m.dim)
    console.print(mt)
    it = _table("", "index_version", "model_version", "products", "created", title="index versions")
    for v in versions:
        _row(it, "*" if v.is_active else "", v.index_version, v.model_version,
             v.manifest.get("counts", {}).get("products", ""), f"{v.created_at:%Y-%m-%d %H:%M}")
    console.print(it)


@models_app.command("activate")
def models_activate(
    version: Annotated[str, typer.Argument(help="an index version, or a model version (its newest index)")],
) -> None:
    """Serve VERSION: roll back or forward in one transaction; running servers swap on their next query."""
    from feedback import activate_version
    from store import Store

    settings = _settings()
    try:
        record = activate_version(Store.open(settings.db_url), version)
    except _known_errors() as exc:
        _fail(str(exc))
    typer.echo(f"active: index version {record.index_version} (model {record.model_version})")


@models_app.command("canary")
def models_canary(
    version: Annotated[Optional[str], typer.Argument(
        help="a model version (its newest index) or an index version to interleave with the serving one")] = None,
    fraction: Annotated[Optional[float], typer.Option(
        help="share of searches that get the interleaved ranking, in (0, 1]")] = None,
    stop: Annotated[bool, typer.Option("--stop", help="stop the running canary; the serving version stays")] = False,
    review: Annotated[bool, typer.Option(
        "--review", help="apply the decision rule to the evidence now: promote, stop, or keep going")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Interleaved canary: VERSION --fraction F starts one; --stop, --review; no arguments: its state.

    That fraction of searches gets the team-draft interleaving of the serving and VERSION's
    rankings; clicks are credited to the ranking that contributed the clicked product. The
    candidate is promoted when it wins at p < PRISM_CANARY_ALPHA after PRISM_CANARY_MIN_QUERIES
    searches with a winner, and stopped when it loses (servers review as events arrive)."""
    from feedback import CanaryError, review_canary, start_canary, stop_canary
    from store import CanaryConflictError, Store

    if sum((version is not None, stop, review)) > 1:
        _fail("give VERSION --fraction F, or --stop, or --review, or nothing (the canary's state)")
    if version is not None and fraction is None:
        _fail("starting a canary needs --fraction F, the share of searches to interleave, in (0, 1]")
    if version is None and fraction is not None:
        _fail("--fraction goes with a VERSION to start a canary of")
    settings = _settings()
    try:
        store = Store.open(settings.db_url, lexical=settings.lexical())
        if version is not None:
            start_canary(store, version, fraction, policy=settings.canary_policy(), started_by="cli")
        elif stop:
            stop_canary(store, by="cli")
        elif review:
            outcome = review_canary(store, by="cli")
            if outcome is None:
                _fail("no canary is running")
    except (CanaryError, CanaryConflictError) as exc:
        _fail(str(exc))
    except _known_errors() as exc:
        _fail(str(exc))
    _print_canary(store, as_json)


def _print_canary(store, as_json: bool) -> None:
    from api.routes.models import canary_out, latest_canary

    record = latest_canary(store)
    view = None if record is None else canary_out(store, None, record)
    if as_json:
        typer.echo(json.dumps(None if view is None else view.model_dump(mode="json"), indent=2))
        return
    if view is None:
        typer.echo("no canary has run; start one with `prism models canary VERSION --fraction F`")
        return
    typer.echo(f"canary {view.id}: {view.status} - {view.candidate_index_version} (model {view.candidate_model_version}) "
               f"against {view.serving_index_version} (model {view.serving_model_version}) on "
               f"{view.fraction:.1%} of searches, started {view.started_at:%Y-%m-%d %H:%M} by {view.started_by}")
    table = _table("arm", "impressions", "clicks", "wins")
    for arm in ("serving", "candidate"):
        counts = getattr(view, arm)
        _row(table, arm, counts.impressions, counts.clicks, counts.wins)
    _console().print(table)
    typer.echo(f"{view.searches} interleaved searches, {view.decided} with a winner, {view.ties} ties; "
               f"p = {view.p_value:.4g}")
    if view.decision:
        typer.echo(view.decision)


@app.command()
def retrain(
    nightly: Annotated[bool, typer.Option("--nightly", help="keep running; run the job every day at --at")] = False,
    at: Annotated[str, typer.Option(help="local time of day for --nightly, HH:MM")] = "03:00",
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
) -> None:
    """Mine clicks, fine-tune the serving model, and promote it only if it wins on later clicks."""
    at_time = _time_of_day("--at", at)
    settings = _settings(device=device)
    settings.apply_threads()
    if not nightly:
        _retrain_once(settings, as_json=as_json)
        return
    from feedback import run_nightly

    typer.echo(f"retraining every day at {at_time:%H:%M} (local time); Ctrl-C stops", err=True)
    try:
        run_nightly(lambda: _retrain_once(settings, as_json=as_json, exit_on_error=False), at_time)
    except KeyboardInterrupt:
        _fail("stopped", 130)


def _time_of_day(flag: str, value: str):
    from datetime import datetime

    try:
        return datetime.strptime(value, "%H:%M").time()
    except ValueError:
        _fail(f"{flag} takes a time of day as HH:MM (24-hour), not {value!r}")


@app.command()
def worker(
    nightly_at: Annotated[Optional[str], typer.Option(
        "--nightly-at", help="also queue a run every day at this local time, HH:MM (once over all workers)")] = None,
    poll: Annotated[float, typer.Option(min=0.1, max=3600, help="seconds between looks at the queue")] = 2.0,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda")] = None,
) -> None:
    """Run queued retrain runs (POST /v1/retrain, --nightly-at) until SIGTERM or Ctrl-C.

    Any number of workers, on any hosts sharing the database: each run is claimed by one. On
    SIGTERM a run still training is abandoned (recorded as failed), one past training finishes;
    then the worker exits 0. Distributed training (`--ray`) is not part of this command."""
    import signal
    import threading

    # First, before the slow imports: a SIGTERM while starting up is a stop request too.
    stopping = threading.Event()

    def stop(signum, _frame) -> None:
        if not stopping.is_set():
            typer.echo(f"{signal.Signals(signum).name}: stopping (a run still training is abandoned)", err=True)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    from embedder import resolve_device
    from feedback import RetrainWorker
    from store import Store

    at_time = None if nightly_at is None else _time_of_day("--nightly-at", nightly_at)
    settings = _settings(device=device)
    settings.apply_threads()
    # The worker's log is its report: runs claimed, outcomes, the nightly schedule.
    for name in ("feedback", "indexer"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        store = Store.open(settings.db_url)
    except _known_errors() as exc:
        _fail(str(exc))

    def report(outcome) -> None:
        typer.echo(f"run {outcome.run_id}: {outcome.status}, {outcome.decision}"
                   + (f" ({outcome.reason})" if outcome.reason else ""))

    runner = RetrainWorker(
        store, home=settings.home, config=settings.retrain_config(), index_options=settings.index_options(),
        device=resolve_device(settings.device), poll_s=poll, nightly_at=at_time, on_outcome=report, stopping=stopping,
    )
    typer.echo(f"worker {runner.name} on {settings.home.resolve()}: waiting for queued retrain runs"
               + (f"; nightly at {at_time:%H:%M} (local time)" if at_time else ""), err=True)
    try:
        runner.run()
    finally:
        store.close()
    typer.echo("worker stopped", err=True)


def _retrain_once(settings, *, as_json: bool, exit_on_error: bool = True) -> None:
    from embedder import resolve_device
    from feedback import RetrainBusyError, RetrainError, run_retrain
    from store import Store

    try:
        store = Store.open(settings.db_url)
        with _progress_bar(as_json, train=True, log_every_s=settings.progress_log_s) as progress:
            outcome = run_retrain(
                store, home=settings.home, config=settings.retrain_config(), index_options=settings.index_options(),
                device=resolve_device(settings.device), progress=_RichTrainProgress(progress),
            )
    except KeyboardInterrupt:
        _fail("interrupted; the serving version is unchanged (the run is recorded as failed)", 130)
    except (RetrainBusyError, RetrainError, *_known_errors()) as exc:
        if not exit_on_error:
            raise
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(outcome.to_dict(), indent=2, default=str))
        return
    gate = outcome.metrics.get("gate", {})
    typer.echo(f"run {outcome.run_id}: {outcome.status}, {outcome.decision}"
               + (f" ({outcome.reason or gate.get('why', '')})" if (outcome.reason or gate) else ""))
    if gate:
        for name in ("serving", "candidate"):
            later, cat = gate[name]["later_clicks"], gate[name]["catalog"]
            typer.echo(f"  {name:<9} later clicks MRR {later['mrr']:.4f}  recall@10 {later['recall@10']:.4f}  "
                       f"nDCG@10 {later['ndcg@10']:.4f} | catalog recall@1 {cat.get('recall@1', 0.0):.4f}  "
                       f"recall@10 {cat['recall@10']:.4f}")
        _print_gate_slices(gate)
    canary = outcome.metrics.get("canary")
    if outcome.decision == "canary" and canary:
        typer.echo(f"  canary {canary['id']}: model {outcome.candidate_model_version}, index {outcome.index_version} "
                   f"interleaved on {canary['fraction']:.1%} of searches; `prism models canary` follows it")
    elif outcome.decision == "promoted" and outcome.index_version:
        typer.echo(f"  serving now: model {outcome.candidate_model_version}, index {outcome.index_version}")
    retention = outcome.metrics.get("retention")
    if retention:
        typer.echo(f"  retention: pruned {retention['searches_pruned']} searches and {retention['events_pruned']} "
                   f"events older than {retention['days']:g} days")


def _print_gate_slices(gate: dict) -> None:
    """The later queries by slice: how many, both models' MRR, the lift and its interval."""
    for name, label in (("all", "all later queries"), ("seen_in_training", "seen in training clicks"),
                        ("new", "new queries")):
        sl = gate.get("slices", {}).get(name)
        if not sl:
            continue
        interval = (f"{sl['level']:.0%} CI [{sl['ci_low']:+.4f}, {sl['ci_high']:+.4f}]" if sl["queries"]
                    else "no queries")
        typer.echo(f"  {label:<24} {sl['queries']:>6} queries  MRR {sl['serving_mrr']:.4f} -> "
                   f"{sl['candidate_mrr']:.4f}  lift {sl['lift']:+.4f}  {interval}")


ProductIdArg = Annotated[str, typer.Argument(help="the catalog's product id", show_default=False)]


def _product_id(product_id: str) -> str:
    # The id rules of the /v1/products/{id} routes, so an id HTTP refuses is refused here too.
    from pydantic import TypeAdapter, ValidationError

    from api.schemas import ProductId

    try:
        return TypeAdapter(ProductId).validate_python(product_id)
    except ValidationError as exc:
        _fail(f"PRODUCT_ID: {exc.errors()[0]['msg']}")


@products_app.command("get")
def products_get(
    product_id: ProductIdArg,
    as_json: Annotated[bool, typer.Option("--json", help="print it as JSON, as GET /v1/products/{id} answers it")] = False,
) -> None:
    """Show one product as GET /v1/products/{id} does (exit 1 when there is none by that id)."""
    product_id = _product_id(product_id)
    from api.routes.common import product_detail
    from api.schemas import ProductOut
    from store import Store

    settings = _settings()
    try:
        store = Store.open(settings.db_url)
        product = store.get_product(product_id)
        detail = None if product is None else product_detail(store, product)
    except _known_errors() as exc:
        _fail(str(exc))
    if product is None:
        _fail(f"no product {product_id!r}", 1)
    body = ProductOut.model_validate(detail).model_dump(mode="json")
    if as_json:
        typer.echo(json.dumps(body, indent=2, ensure_ascii=False))
        return
    table = _table("field", "value", title=f"product {product_id}", show_header=False)
    for field, value in body.items():
        if field == "attributes":
            value = json.dumps(value, ensure_ascii=False) if value else ""
        _row(table, field, value)
    _console().print(table)


@products_app.command("delete")
def products_delete(product_id: ProductIdArg) -> None:
    """Delete one product as DELETE /v1/products/{id} does: the deletion is journaled, so running
    servers stop returning it on their next query (exit 1 when there is none by that id)."""
    product_id = _product_id(product_id)
    from indexer import CatalogUpdater
    from store import Store

    settings = _settings()
    try:
        store = Store.open(settings.db_url)
        # The route's own service: it soft-deletes the row and writes the journal entry that
        # serving engines replay, in one transaction.
        updater = CatalogUpdater(
            home=settings.artifacts, store=store, image_limits=settings.image_limits(),
        )
        deleted = updater.delete(product_id)
    except _known_errors() as exc:
        _fail(str(exc))
    if deleted is None:
        _fail(f"no product {product_id!r}", 1)
    typer.echo(f"deleted product {product_id!r}; servers drop it from results on their next query")


@products_app.command("patch")
def products_patch(
    product_id: ProductIdArg,
    title: Annotated[Optional[str], typer.Option(help="new title (re-embeds the product's text)")] = None,
    description: Annotated[Optional[str], typer.Option(help="new description (re-embeds the product's text)")] = None,
    category: Annotated[Optional[str], typer.Option(help="new category")] = None,
    brand: Annotated[Optional[str], typer.Option(help="new brand")] = None,
    price: Annotated[Optional[float], typer.Option(help="new price")] = None,
    currency: Annotated[Optional[str], typer.Option(help="new currency, a 3-letter code")] = None,
    stock: Annotated[Optional[int], typer.Option(help="units on hand")] = None,
    attributes: Annotated[Optional[str], typer.Option(help="new attributes, a JSON object (replaces them all)")] = None,
    clear: Annotated[Optional[list[str]], typer.Option(
        help="clear this field (repeatable): description, category, brand, price, currency or stock")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the product as PATCH /v1/products/{id} answers")] = False,
) -> None:
    """Change some fields of one product as PATCH /v1/products/{id} does: price, currency, stock,
    category, brand and attributes embed nothing; a new title or description is embedded with the
    serving model. Journaled: running servers serve it on their next query (exit 1 when there is no
    product by that id)."""
    product_id = _product_id(product_id)
    from pydantic import ValidationError

    from api.schemas import ProductPatch

    body: dict = {name: value for name, value in (
        ("title", title), ("description", description), ("category", category), ("brand", brand), ("price", price),
        ("currency", currency), ("stock", stock)) if value is not None}
    if attributes is not None:
        try:
            body["attributes"] = json.loads(attributes)
        except ValueError as exc:
            _fail(f"--attributes: not JSON ({exc})")
    for name in clear or []:
        if name in body:
            _fail(f"--clear {name} and --{name}: give one of them")
        body[name] = None
    try:
        patch = ProductPatch.model_validate(body)
    except ValidationError as exc:
        _fail("; ".join(f"{'--' + '.'.join(str(x) for x in e['loc']) + ': ' if e['loc'] else ''}{e['msg']}"
                        for e in exc.errors()))
    changes = patch.changes()
    from api.routes.common import product_detail
    from api.schemas import ProductUpserted
    from indexer import CatalogUpdater, UpdateError
    from store import Store

    settings = _settings()
    try:
        store = Store.open(settings.db_url)
        updater = CatalogUpdater(home=settings.artifacts, store=store, image_limits=settings.image_limits())
        embedder = _serving_embedder(settings, store) if updater.patch_may_embed(changes) else None
        outcome = updater.patch(product_id, changes, embedder)
    except (*_known_errors(), UpdateError) as exc:
        _fail(str(exc))
    if outcome is None:
        _fail(f"no product {product_id!r}", 1)
    if as_json:
        body = ProductUpserted(**product_detail(store, outcome.product), created=False, image_action=outcome.image_action,
                               catalog_seq=outcome.seq).model_dump(mode="json")
        typer.echo(json.dumps(body, indent=2, ensure_ascii=False))
        return
    how = "nothing re-embedded" if outcome.metadata_only else "re-embedded"
    typer.echo(f"patched product {product_id!r} ({', '.join(sorted(changes))}; {how}); servers serve it on their "
               "next query")


def _serving_embedder(settings, store):
    """The model of the active index version, as a server would embed with it."""
    from embedder import load_embedder
    from search import NotReadyError

    active = store.active_index_version()
    model = store.get_model_version(active.model_version) if active is not None else None
    if model is None:
        raise NotReadyError("no index version is active yet: run `prism index CATALOG` first")
    settings.apply_threads()
    # At the precision the index was built at, as the server encodes (search.engine).
    return load_embedder(model.spec, device=settings.device, models_dir=settings.models_dir,
                         image_limits=settings.image_limits(), precision=active.manifest.get("precision", "fp32"))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Prism's own notices (random weights) as one plain line, not Python's "file:line: Category:
    message" plus the source line; every other warning as Python shows it."""
    factory = sys.modules.get("embedder.factory")
    if factory is not None and issubclass(category, factory.RandomWeightsWarning):
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
        return
    _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def _help_width() -> None:
    """On a pipe typer renders --help 80 columns wide and cuts option names to fit; give it room.
    TERMINAL_WIDTH (typer's own setting) or COLUMNS, when set, still decide."""
    if sys.stdout.isatty() or os.environ.get("TERMINAL_WIDTH") or os.environ.get("COLUMNS"):
        return
    # Read by typer.rich_utils when it is first imported, which happens only when help or a usage
    # error is printed: importing it here would cost every command ~50 ms.
    os.environ["TERMINAL_WIDTH"] = str(HELP_WIDTH)
    rich_utils = sys.modules.get("typer.rich_utils")
    if rich_utils is not None:
        rich_utils.MAX_WIDTH = HELP_WIDTH


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.showwarning = _show_warning
    _help_width()
    app()


if __name__ == "__main__":
    sys.exit(main())
