"""The driver's Ray cluster: which one `RAY_ADDRESS` names, joining it (or starting a local one on loopback), and the
autoscaler's standing request for room."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from core.errors import ConfigError, Unreachable
from jobs.storage import first_line
from orchestrator.signals import Terminated, handlers_kept

RAY_CONNECT_TIMEOUT_S = 5.0  # how long `cluster_address` waits for RAY_ADDRESS's port to accept a connection
RAY_ADDRESS_FIX = ("start that cluster (`ray start --head`) and set RAY_ADDRESS to its GCS address (HEAD:6379) or Ray "
                   "Client address (ray://HEAD:10001), or unset RAY_ADDRESS to run on a local Ray")


def cluster_address(timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> str | None:
    """The cluster `RAY_ADDRESS` names, checked: None when it is unset, empty or `local` (a local Ray); `auto` as is
    (Ray finds it); a `host:port` (GCS) or `ray://host:port` (Ray Client) only when that port accepts a TCP connection
    within `timeout_s`. Otherwise a one-line ConfigError (not a Ray address) or Unreachable (nothing answers)."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address in ("", "local"):
        return None
    if address == "auto":
        return address
    scheme, _, host_port = address.rpartition("://")
    parts = urlsplit(f"//{host_port}")
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = None
    if scheme not in ("", "ray") or not parts.hostname or port is None or parts.path:
        raise ConfigError("RAY_ADDRESS", [f"{address!r} is not a Ray address: use host:port (the GCS, e.g. HEAD:6379), "
                                          "ray://host:port (Ray Client), auto or local, or unset it for a local Ray"])
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise Unreachable(f"RAY_ADDRESS={address}: nothing accepts connections at {parts.hostname}:{port} "
                          f"({first_line(exc)}); {RAY_ADDRESS_FIX}") from None
    return address


def connect_ray() -> None:
    """Join the cluster this driver was submitted to (`RAY_ADDRESS`, see `cluster_address`), else start a local one on
    loopback. A cluster Ray cannot join is a one-line Unreachable, not Ray's exit or traceback."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address()
    with handlers_kept():  # Ray's SIGTERM handlers would replace the command's own (exit_on_signals)
        if address is None:
            start_local_ray()
            return
        try:
            ray.init(address=address, log_to_driver=False)
        except Terminated:
            raise
        except (SystemExit, ConnectionError) as exc:  # Ray exits (status 15) when its GCS client gives up
            cause = f"exit status {exc.code}" if isinstance(exc, SystemExit) else first_line(exc)
            raise Unreachable(f"RAY_ADDRESS={address}: Ray could not join a cluster there ({cause}); "
                              f"{RAY_ADDRESS_FIX}") from None


def start_local_ray() -> None:
    """The embedded default: a one-node Ray on loopback. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at 1 (Linux's default)
    Ray swaps 127.0.0.1 for the address it would use to reach the internet and listens on every interface. Ray reads the
    variable when it is imported, so its constant is set too (ray may have been imported before this call). Ray 2.60 has
    no public API for this switch: `ray._private.ray_constants` is the only way in. `address="local"` always starts a
    new one: without it Ray joins the cluster the machine's last `ray start` recorded (/tmp/ray/ray_current_cluster)."""
    import ray
    from ray._private import ray_constants

    os.environ.setdefault(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    ray_constants.ENABLE_RAY_CLUSTER = os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR].lower() in ("1", "true")
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)


def request_capacity(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for room for `bundles` at once (its standing request, replaced by every call; nothing happens
    on a cluster without an autoscaler). [] withdraws it, so the cluster can scale down once the sweep ends."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{name: amount for name, amount in bundle.items() if amount > 0} for bundle in bundles])
