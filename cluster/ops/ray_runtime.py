"""Starting (or joining) Ray so that every process it runs listens on one host only.

Strata promises that every process it starts listens on 127.0.0.1. With a plain
``ray.init()`` on Linux, Ray's GCS, raylet (node manager and object manager), the core
worker gRPC server of the driver and of every worker, the dashboard agent (gRPC, HTTP and
metrics export), the runtime env agent and the autoscaler and dashboard metrics servers
all listen on 0.0.0.0 / :: or on the machine's routable address.

Every one of them decides from the *node IP address*: the C++ servers listen on
127.0.0.1 only when the node IP is 127.0.0.1, and the Python ones check
``is_localhost(node_ip)`` (ray/dashboard/agent.py, http_server_agent.py,
modules/reporter/reporter_agent.py, dashboard/head.py, autoscaler/_private/monitor.py) or
bind the node IP itself (ray/_private/runtime_env/agent/main.py). Each child process gets
that IP from the driver on its command line (``--node-ip-address``).

Passing ``_node_ip_address="127.0.0.1"`` to ``ray.init`` is not enough on its own:
``ray.init`` runs it through ``services.resolve_ip_for_localhost``, which replaces a
loopback address by the routable one unless ``ray_constants.ENABLE_RAY_CLUSTER`` is
false (ray/_private/services.py, ``resolve_ip_for_localhost`` and
``get_node_ip_address``). That constant is read from the environment variable
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when ``ray`` is first imported
(ray/_private/ray_constants.py); it is Ray's own switch for a single-machine Ray, and
``init_local_ray`` turns it off when ``host`` is a loopback address.
"""

from __future__ import annotations

import ipaddress
import os

import ray
import ray._private.ray_constants as ray_constants

__all__ = ["init_local_ray"]

# Ray's switch between a single-machine Ray (node IP = loopback) and a cluster node
# (node IP = the routable address), read once when `ray` is imported.
_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local_ray(
    *,
    address: str | None,
    num_cpus: int | None,
    namespace: str | None,
    host: str = "127.0.0.1",
) -> None:
    """Start a local Ray (``address`` empty) or join one, with its processes on ``host``.

    ``host`` becomes Ray's node IP address, which is what every Ray process binds to. When
    joining (``address`` set, e.g. ``"auto"``), the Ray node on this machine must have been
    started with the same node IP (for 127.0.0.1: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    ray start --head --node-ip-address=127.0.0.1``); otherwise ``ray.init`` raises
    ConnectionError (from "No node info found matching attributes: '127.0.0.1'", after
    Ray's GCS request timeout, 60 s by default) rather than run a driver that the rest of
    that node cannot reach.
    """
    if _is_loopback(host):
        # Both halves are needed, before ray.init:
        # - this process imported `ray` (and read the variable) long before now, so the
        #   constant that `resolve_ip_for_localhost` consults is set directly; without it
        #   ray.init turns "127.0.0.1" back into the routable address;
        # - the variable itself is inherited by every process Ray starts (GCS, raylet,
        #   agents, workers), so that one that works out the node IP on its own instead
        #   of taking --node-ip-address (e.g. the runtime env agent, for its log prefix)
        #   also gets the loopback address.
        os.environ[_CLUSTER_SWITCH] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        address=address or None,
        num_cpus=num_cpus,
        namespace=namespace,
        include_dashboard=False,
        # The dashboard's HTTP server is off, but say where it would listen anyway.
        dashboard_host=host,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONHASHSEED": "0"}},
        _node_ip_address=host,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
