"""A multi-node Ray cluster on one machine, on loopback, for development and tests.

    python infra/local_cluster.py start --workers 2 [--port 6390]   # head + 2 worker nodes
    python infra/local_cluster.py stop --port 6390                   # stops exactly this cluster's processes

The head advertises no `worker` resource and 0 CPUs for jobs beyond the driver; each worker node
advertises `{"worker": 1}` and its own CPUs, so a sweep whose jobs ask for `worker` lands on workers.
`stop` kills only processes whose command line names this cluster's GCS address or port, never another
Ray on the machine (unlike `ray stop`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import psutil

HOST = "127.0.0.1"
# Ray replaces 127.0.0.1 by the machine's first interface address unless this is 0: keep every
# process of the cluster on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _ray(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ | LOOPBACK_ENV)


def ray_bin() -> str:
    """The `ray` executable next to this interpreter."""
    return os.path.join(os.path.dirname(sys.executable), "ray")


def start_head(port: int, num_cpus: int = 1, dashboard: bool = True) -> str:
    """Start the head node; returns its address."""
    command = [ray_bin(), "start", "--head", f"--node-ip-address={HOST}", f"--port={port}", f"--num-cpus={num_cpus}",
               "--disable-usage-stats", f"--include-dashboard={'true' if dashboard else 'false'}", f"--dashboard-host={HOST}",
               f"--dashboard-port={port + 1}"]
    _ray(command)
    return f"{HOST}:{port}"


def start_worker(address: str, num_cpus: int = 1, resources: dict[str, float] | None = None) -> None:
    """Join a worker node advertising `resources` (default `{"worker": 1}`)."""
    command = [ray_bin(), "start", f"--address={address}", f"--node-ip-address={HOST}", f"--num-cpus={num_cpus}",
               f"--resources={json.dumps(resources or {'worker': 1})}", "--disable-usage-stats"]
    _ray(command)


def cluster_processes(port: int) -> list[psutil.Process]:
    """Processes of the cluster whose GCS listens on `port` (head, raylets, workers, dashboard)."""
    marks = (f"{HOST}:{port}", f"gcs_server_port={port}", f"--port={port}", f"gcs-address={HOST}:{port}")
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(mark in cmdline for mark in marks) and process.pid != os.getpid():
            found.append(process)
    return found


def raylet_pids(port: int) -> list[int]:
    """PIDs of the raylets (one per node) of the cluster."""
    return [p.pid for p in cluster_processes(port) if "raylet" in " ".join(p.cmdline()[:1])]


def stop(port: int, timeout_s: float = 10.0) -> int:
    """SIGTERM then SIGKILL every process of the cluster; returns how many there were."""
    processes = cluster_processes(port)
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return len(processes)


def wait_for_nodes(address: str, count: int, timeout_s: float = 60.0) -> None:
    """Block until `count` nodes are alive."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run([ray_bin(), "status", f"--address={address}"], capture_output=True, text=True, env=os.environ | LOOPBACK_ENV)
        if out.returncode == 0 and out.stdout.count("node_") >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"Ray cluster at {address} did not reach {count} nodes in {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--workers", type=int, default=2, help="worker nodes to start")
    parser.add_argument("--port", type=int, default=6390, help="GCS port of the head")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    args = parser.parse_args(argv)
    if args.action == "stop":
        print(f"stopped {stop(args.port)} processes of the cluster on port {args.port}")
        return 0
    address = start_head(args.port)
    for _ in range(args.workers):
        start_worker(address, args.cpus_per_worker)
    wait_for_nodes(address, args.workers + 1)
    print(f"cluster up: RAY_ADDRESS={address}, dashboard http://{HOST}:{args.port + 1}, {args.workers} workers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
