"""A real local Ray cluster for a test module: a head and one worker node on loopback, in a
directory of its own."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def isolated_cluster(**node) -> Iterator:
    """A head and one worker node, each with `node`'s resources; removed with its directory on exit.

    The directory goes in through RAY_TMPDIR, not the head's `temp_dir`: Ray also writes the
    cluster's address to `<RAY_TMPDIR or /tmp>/ray/ray_current_cluster`, and only the default temp
    dir creates that `ray` directory (on a fresh host /tmp/ray does not exist). Its own directory
    also keeps the cluster away from any other Ray on this host. The name is short: Ray's unix
    socket paths under it must fit in ~107 bytes.
    """
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="prism-ray-")
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if cluster is not None:
            cluster.shutdown()
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        shutil.rmtree(temp_dir, ignore_errors=True)
