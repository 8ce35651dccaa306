"""What the CLI prints when its output goes to a pipe or a file (as in these subprocesses): tables
and --help at full width, CJK and bracketed catalog text intact, and one clean line about random
weights instead of a Python warning and open_clip's log line."""

import csv
import json

import pytest

from prism_cli import run_prism
from sample_catalog import make_catalog

pytestmark = pytest.mark.filterwarnings("ignore:prism-tiny-vit:UserWarning")

RANDOM_WEIGHTS_LINE = "warning: prism-tiny-vit:random: random weights (seed 0); results carry no meaning"
CJK_TITLE = "红色跑鞋超轻防水透气男款女款运动鞋春夏新品"  # no spaces to wrap at, as CJK titles go
BRACKETED_TITLE = "[b]Sale[/b] :apple: [/oops] 50%"


def _piped(env: dict) -> dict:
    env = dict(env)
    for name in ("COLUMNS", "LINES", "TERMINAL_WIDTH", "FORCE_COLOR", "TTY_COMPATIBLE"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("cjk-catalog")
    path = make_catalog(root, 24)
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rows[0]["title"], rows[1]["title"] = CJK_TITLE, BRACKETED_TITLE
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory, databases, catalog):
    """A home indexed by `prism index --json` with random weights; returns (env, that run)."""
    env = _piped(databases.env(tmp_path_factory.mktemp("cli-output-home"), PRISM_MODEL="prism-tiny-vit:random"))
    first = run_prism(["index", str(catalog), "--batch-size", "16", "--json"], env)
    return env, first


def test_random_weights_are_one_clean_line(home):
    env, first = home
    assert first.stderr.strip().splitlines() == [RANDOM_WEIGHTS_LINE], first.stderr
    searched = run_prism(["search", "red shoe", "-k", "2"], env)
    assert searched.stderr.strip().splitlines() == [RANDOM_WEIGHTS_LINE], searched.stderr
    assert "UserWarning" not in searched.stderr and "WARNING root" not in searched.stderr


def test_tables_on_a_pipe_are_not_cut_to_80_columns(home):
    env, _ = home
    listing = json.loads(run_prism(["models", "list", "--json"], env).stdout)
    shown = run_prism(["models", "list"], env).stdout
    for index in listing["indexes"]:
        assert index["index_version"] in shown and index["model_version"] in shown, shown
    for model in listing["models"]:
        assert model["model_version"] in shown and model["spec"] in shown, shown
    assert "…" not in shown
    assert max(len(line) for line in shown.splitlines()) > 80  # the tables are wider than that


def test_cjk_and_bracketed_titles_print_whole(home):
    env, _ = home
    wide = run_prism(["search", CJK_TITLE, "--target", "text", "-k", "3"], env).stdout
    assert CJK_TITLE in wide, wide
    # In a narrow terminal a title wraps; no character of it may go missing.
    narrow = run_prism(["search", CJK_TITLE, "--target", "text", "-k", "3"], {**env, "COLUMNS": "60"}).stdout
    assert max(len(line) for line in narrow.splitlines()) <= 60
    assert CJK_TITLE in "".join(ch for ch in narrow if ch in CJK_TITLE), narrow
    assert "…" not in narrow
    # Catalog text is not rich markup: brackets and :codes: are printed as they are.
    product = json.loads(run_prism(["search", BRACKETED_TITLE, "--target", "text", "-k", "1", "--json"], env).stdout)
    pid = product["results"][0]["product_id"]
    assert product["results"][0]["title"] == BRACKETED_TITLE
    shown = run_prism(["products", "get", pid], env).stdout
    assert BRACKETED_TITLE in shown, shown


def _commands(group, path=()):
    import click

    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


def test_help_on_a_pipe_is_not_cut(databases, tmp_path):
    import typer

    from api.cli import app

    env = _piped(databases.env(tmp_path))
    root = typer.main.get_command(app)
    for path, command in [((), root), *_commands(root)]:
        out = run_prism([*path, "--help"], env).stdout
        assert "…" not in out, (path, out)
        for param in command.params:
            for name in (*param.opts, *param.secondary_opts):
                if name.startswith("--"):
                    assert name in out, (path, name, out)


def test_a_long_job_in_a_log_file_prints_progress_lines(tmp_path, databases, catalog):
    """rich draws bars on a pipe only when they end; a job's log must still show it is moving."""
    import re

    env = _piped(databases.env(tmp_path / "home", PRISM_MODEL="prism-tiny-vit:random", PRISM_PROGRESS_LOG_S="0.02"))
    proc = run_prism(["index", str(catalog), "--batch-size", "4"], env)
    lines = [line for line in proc.stderr.splitlines() if re.fullmatch(r"\d\d:\d\d:\d\d embed [a-z ]+: \d+/24 \(\d+%\), \d+s elapsed.*", line)]
    assert lines, proc.stderr
    assert " elapsed" not in proc.stdout  # progress goes to stderr, the summary to stdout
