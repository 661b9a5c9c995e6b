"""A multi-node Ray cluster on one machine, on loopback only, for development, tests and benchmarks.

    python infra/local_cluster.py start [--workers 2] [--port 6390] [--cpus-per-worker 1] [--gpus-per-worker 0]
    python infra/local_cluster.py env   [--port 6390]   # `export` lines for a client (ray job submit, a driver)
    python infra/local_cluster.py stop  [--port 6390]   # stops exactly this cluster's processes

The head takes no CPUs (it hosts the GCS, the dashboard and `ray job submit` drivers); each worker node
advertises `{"worker": 1}` and its CPUs (and fake GPUs with `--gpus-per-worker`), so jobs land on workers.

Loopback only. Every Ray process binds 127.0.0.1 (checked with `ss -tlnp`) because every node's IP is
127.0.0.1 and `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: with that variable at 1 (Linux's default) Ray
replaces 127.0.0.1 by the address it would use to reach the internet, and any other node IP (even
127.0.0.2) makes the GCS, raylets and agents listen on all interfaces. At 0, `ray start --address` refuses
to add a node ("Multi-node Ray clusters are not supported on Windows and OSX"), a guard read from that same
constant; worker nodes are therefore started through `ray start` with only that guard lifted
(`_ray_start_worker`), everything else as Ray ships it. Several nodes on one IP is what Ray's own
`ray.cluster_utils.Cluster` does.

Token authentication is on (`RAY_AUTH_MODE=token`) with a token file private to the cluster, so a
`~/.ray/auth_token` written by some other `ray.init` never matters; `env()` gives clients what they need.
Every process the cluster starts carries `LORALAND_LOCAL_CLUSTER=<its folder>` in its environment; `stop`
signals those processes and their descendants, never another Ray on the machine (unlike `ray stop`).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from core.ports import LOOPBACK, free_port

HOST = LOOPBACK  # every node of the cluster binds loopback only
CLUSTER_MARK = "LORALAND_LOCAL_CLUSTER"  # environment variable on every process of a cluster: its folder
NODE_MARK = "LORALAND_LOCAL_NODE"  # ... and the node's name (head, worker-1, ...)
# Jobs pass small objects; Ray's default (30% of memory per node) is far too much here.
OBJECT_STORE_BYTES = 200 * 1024**2
# A killed raylet is declared dead after period x threshold (~3 s) instead of Ray's ~15 s.
FAST_FAILURE_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def ray_bin() -> str:
    """The `ray` executable next to this interpreter."""
    return str(Path(sys.executable).parent / "ray")


def free_port_block(size: int = 3, low: int = 20000, high: int = 32000) -> int:
    """The first of `size` consecutive free ports below the kernel's ephemeral range (where Ray's OS-chosen ports
    land)."""
    for _ in range(200):
        first = random.randrange(low, high - size)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + size):
                    stack.enter_context(socket.socket()).bind((HOST, port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {size} consecutive free ports between {low} and {high}")


def is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8 and ::1, also written as IPv4-mapped IPv6 (::ffff:127.0.0.1); False for wildcards."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@dataclass
class LocalCluster:
    """One loopback cluster, known by its GCS port; its state lives in `root` (default /tmp/loraland-ray-PORT)."""

    port: int = 6390
    root: Path | None = None
    workers: list[str] = field(default_factory=list)
    lost: list[psutil.Process] = field(default_factory=list)  # processes of nodes killed by kill_raylet

    def __post_init__(self) -> None:
        if not 1024 < self.port < 65000:
            raise ValueError(f"--port must be between 1025 and 64999 (got {self.port})")
        self.root = Path(self.root or Path(tempfile.gettempdir()) / f"loraland-ray-{self.port}")

    @property
    def address(self) -> str:
        """The GCS address (`ray.init(address=...)`, `RAY_ADDRESS` of a driver)."""
        return f"{HOST}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard and Jobs API (`ray job submit --address ...`)."""
        return f"http://{HOST}:{self.port + 1}"

    @property
    def token_path(self) -> Path:
        return self.root / "auth_token"

    def env(self) -> dict[str, str]:
        """What a client of this cluster needs in its environment: addresses and the token (before `import ray`: Ray
        reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when imported, and with it at 1 dials 127.0.0.1 by the machine's
        external address)."""
        return {"RAY_ADDRESS": self.address, "RAY_API_SERVER_ADDRESS": self.dashboard_url, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_path), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def _node_env(self, name: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        return base | self.env() | FAST_FAILURE_DETECTION | {CLUSTER_MARK: str(self.root), NODE_MARK: name,
                                                             "RAY_USAGE_STATS_ENABLED": "0"}

    def _run(self, command: list[str], name: str) -> None:
        done = subprocess.run(command, capture_output=True, text=True, env=self._node_env(name), timeout=120)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            raise RuntimeError(f"starting {name} of the cluster on port {self.port} failed: " + " | ".join(tail))

    def _common_flags(self) -> list[str]:
        # OS-chosen worker ports and a small object store per node, as ray.cluster_utils.Cluster does for nodes sharing
        # a host
        return [
            f"--node-ip-address={HOST}",
            f"--temp-dir={self.root / 'ray'}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--disable-usage-stats",
        ]

    def start_head(self) -> None:
        """Start the head: GCS, dashboard (Jobs API), no CPUs for jobs."""
        if cluster_processes(self.root):
            raise RuntimeError(
                f"a cluster already runs on port {self.port} (stop it: python infra/local_cluster.py stop --port "
                f"{self.port})"
            )
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self._run(
            [
                ray_bin(),
                "start",
                "--head",
                f"--port={self.port}",
                f"--dashboard-host={HOST}",
                f"--dashboard-port={self.port + 1}",
                f"--ray-client-server-port={self.port + 2}",
                "--include-dashboard=true",
                "--num-cpus=0",
                "--num-gpus=0",
                *self._common_flags(),
            ],
            "head",
        )

    def add_worker(self, num_cpus: float = 1, num_gpus: int = 0, resources: dict[str, float] | None = None) -> str:
        """Join a worker node advertising `resources` (default `{"worker": 1}`); returns its name."""
        name = f"worker-{len(self.workers) + 1}"
        self._run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "_ray_start_worker",
                f"--address={self.address}",
                f"--num-cpus={num_cpus:g}",
                f"--num-gpus={num_gpus}",
                f"--resources={json.dumps(resources or {'worker': 1})}",
                "--include-log-monitor=false",
                *self._common_flags(),
            ],
            name,
        )
        self.workers.append(name)
        return name

    def start(self, workers: int = 2, num_cpus: float = 1, num_gpus: int = 0, timeout_s: float = 120) -> LocalCluster:
        """Head plus `workers` worker nodes, all alive when this returns; stops what it started if that fails."""
        try:
            self.start_head()
            for _ in range(workers):
                self.add_worker(num_cpus, num_gpus)
            self.wait_for_nodes(workers + 1, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def raylet(self, node: str) -> psutil.Process:
        """The raylet of a node (`head`, `worker-1`, ...)."""
        for process in cluster_processes(self.root):
            try:
                if process.name() == "raylet" and process.environ().get(NODE_MARK) == node:
                    return process
            except psutil.Error:
                continue
        raise LookupError(f"no raylet for node {node!r} of the cluster on port {self.port}")

    def node_id(self, node: str) -> str:
        """Ray's id (hex) of a node."""
        flag = next(arg for arg in self.raylet(node).cmdline() if arg.startswith("--node_id="))
        return flag.split("=", 1)[1]

    def node_of(self, pid: int) -> str:
        """The node a process (a Ray worker running a task) belongs to: the node of the raylet above it."""
        for process in [psutil.Process(pid), *psutil.Process(pid).parents()]:
            if process.name() == "raylet":
                return process.environ()[NODE_MARK]
        raise LookupError(f"process {pid} is not under a raylet of the cluster on port {self.port}")

    def kill_raylet(self, node: str) -> None:
        """SIGKILL a node's raylet: the node is lost, as when its machine is preempted. Its workers and agents exit on
        their own; `stop` still finds them (orphaned, they no longer sit under a marked process)."""
        raylet = self.raylet(node)
        self.lost += raylet.children(recursive=True)
        raylet.kill()

    def kill_node(self, node: str) -> None:
        """SIGKILL a node's raylet and every process under it at once: the machine is gone. (After `kill_raylet` alone,
        a worker may still finish its task and hand the result to its owner.)"""
        raylet = self.raylet(node)
        for process in [raylet, *raylet.children(recursive=True)]:
            try:
                process.kill()
            except psutil.Error:
                continue

    def alive_nodes(self) -> int:
        """How many nodes the GCS counts alive."""
        done = subprocess.run(
            [ray_bin(), "list", "nodes", "--format=json", f"--address={self.dashboard_url}", "--limit=1000"],
            capture_output=True,
            text=True,
            env=os.environ | self.env(),
            timeout=60,
        )
        if done.returncode != 0:
            return 0
        return sum(node.get("state") == "ALIVE" for node in json.loads(done.stdout))

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> None:
        """Block until exactly `count` nodes are alive."""
        deadline = time.monotonic() + timeout_s
        while (alive := self.alive_nodes()) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the cluster on port {self.port} has {alive} nodes alive, not {count}, after {timeout_s:.0f} s"
                )
            time.sleep(1)

    def non_loopback_sockets(self) -> list[str]:
        """Every TCP/UDP socket of the cluster's processes (listening or connected) with an address off loopback."""
        found = []
        for process in cluster_processes(self.root):
            try:
                connections = process.net_connections(kind="inet")
            except psutil.Error:
                continue
            for conn in connections:
                if any(address and not is_loopback(address.ip) for address in (conn.laddr, conn.raddr)):
                    found.append(f"pid {process.pid} {conn.status} {conn.laddr} -> {conn.raddr or '-'}")
        return found

    def stop(self, timeout_s: float = 5) -> int:
        """SIGTERM, then SIGKILL, every process of this cluster; removes its folder; returns how many processes there
        were."""
        processes = list({p.pid: p for p in [*cluster_processes(self.root), *self.lost] if p.is_running()}.values())
        for process in processes:
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(processes, timeout=timeout_s)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=timeout_s)
        shutil.rmtree(self.root, ignore_errors=True)
        return len(processes)


def cluster_processes(root: Path) -> list[psutil.Process]:
    """Every live process of the cluster kept in `root`: those carrying its mark, and their descendants (Ray workers and
    dashboard modules rename themselves, which can overwrite their environment as /proc shows it)."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        try:
            if process.environ().get(CLUSTER_MARK) == str(root):
                found[process.pid] = process
        except (psutil.Error, OSError):
            continue
    for process in list(found.values()):
        try:
            found |= {child.pid: child for child in process.children(recursive=True)}
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _ray_start_worker(argv: list[str]) -> int:
    """`ray start ARGV` for a worker node, with only the "no multi-node on Windows/OSX" guard lifted: that guard reads
    `ENABLE_RAY_CLUSTER`, which must stay False everywhere else so that 127.0.0.1 stays the node's address."""
    import types

    import ray._private.ray_constants as constants
    from ray.scripts import scripts

    guard = types.ModuleType(constants.__name__)
    guard.__dict__.update(vars(constants))
    guard.ENABLE_RAY_CLUSTER = True
    scripts.ray_constants = guard  # only scripts.py sees it; services.get_node_ip_address still reads the real False
    return scripts.cli.main(args=["start", *argv], prog_name="ray", standalone_mode=False) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_ray_start_worker"]:
        return _ray_start_worker(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop", "env", "check"], help="check: list sockets off loopback")
    parser.add_argument("--workers", type=int, default=2, help="worker nodes to start")
    parser.add_argument("--port", type=int, default=6390, help="GCS port of the head (dashboard: +1, Ray client: +2)")
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument("--gpus-per-worker", type=int, default=0, help="fake GPUs each worker node advertises")
    args = parser.parse_args(argv)
    if args.workers < 0 or args.cpus_per_worker < 0 or args.gpus_per_worker < 0:
        parser.error("--workers, --cpus-per-worker and --gpus-per-worker must be >= 0")
    try:
        cluster = LocalCluster(args.port)
        if args.action == "stop":
            print(f"stopped {cluster.stop()} processes of the cluster on port {args.port}")
        elif args.action == "start":
            cluster.start(args.workers, args.cpus_per_worker, args.gpus_per_worker)
            print(f"cluster up: head + {args.workers} workers, dashboard {cluster.dashboard_url}; for clients:")
        elif args.action == "check":
            bad = cluster.non_loopback_sockets()
            print("\n".join(bad) or f"every socket of the cluster on port {args.port} is on loopback")
            return 1 if bad else 0
        if args.action in ("start", "env"):
            print("\n".join(f"export {key}={value}" for key, value in cluster.env().items()))
    except (RuntimeError, TimeoutError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
