"""How the tokenize job reaches Ray: the cluster at `--address` / RAY_ADDRESS, or a local Ray of its own that listens
on loopback only.

`ray.init(_node_ip_address="127.0.0.1")` alone does not do it on Linux: Ray replaces a loopback node address by the
machine's routable one (`services.resolve_ip_for_localhost`, unless its "cluster" mode is off), and its servers bind
the node address (GCS, raylet, object manager, workers, agents) or the wildcard. So while the local Ray starts, its
cluster mode is switched off (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the switch Ray reads to keep a Windows/macOS
node local; every process Ray starts inherits it), then the driver's setting is restored. The node address is then
127.0.0.1 and every listening socket of the processes Ray starts is on 127.0.0.1
(tests/data_pipeline/test_data_robustness.py checks them). The dashboard is off; its head still runs on 127.0.0.1.
What Ray cannot restrict is in README.md (Ray on loopback).
"""

from __future__ import annotations

import contextlib
import os

CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _local_node_mode():
    """Ray's cluster mode off in this process and in what it starts, for the duration of the block."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(CLUSTER_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at ray import time: set it for an already imported ray too
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(CLUSTER_SWITCH, None)
        else:
            os.environ[CLUSTER_SWITCH] = saved_env


def connect_ray(address: str | None, num_cpus: int | None):
    """The `ray` module, initialised: joined to `address` (or RAY_ADDRESS), else a local Ray on loopback with
    `num_cpus` CPUs. An already initialised Ray is used as it is."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return ray
    with _local_node_mode():
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            dashboard_host="127.0.0.1",
            log_to_driver=False,
        )
    return ray
