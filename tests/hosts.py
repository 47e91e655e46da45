"""Separate hosts on this one machine: each a network namespace joined to the machine by a veth pair on
a bridge, reaching PostgreSQL and Redis (which stay in the root namespace, on loopback) through a proxy
of its own on the bridge's address. A host's links can be cut (iptables DROP rules in its namespace,
so its open connections hang as they would across a partition), made lossy (iptables' `statistic`
match) or slow (its proxy's delay).

`Fleet` creates the bridge and the hosts, and removes them, their proxies and the processes started
in them when closed, also after a failed test; a fleet left by a killed test process is removed by
the next one. It needs root, iproute2 and iptables (Debian's `iptables`, which `.ci/run` installs).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from tests.e2e import wait_for
from tests.processes import Process
from tests.workers import Worker, database_url, worker_env

# Owner files of fleets: the pid of the test process that made each, so a later one removes what a
# killed one left. Bridges are `efmh<N>`, namespaces `efmh<N>-<host>`, on the subnet 10.231.<N>.0/24.
STATE = Path("/run/eventflow-hosts")
PREFIX = "efmh"
SERVICES = {"postgres": ("127.0.0.1", 5432), "redis": ("127.0.0.1", 6379)}


class Unavailable(Exception):
    """This machine does not let a test make hosts (no root, no namespaces, no iptables)."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def unavailable() -> str | None:
    """Why hosts cannot be made here, or None when they can."""
    for tool in ("ip", "iptables"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed (apt-get install iproute2 iptables)"
    probe = f"{PREFIX}probe{os.getpid() % 100000}"
    done = _run("ip", "netns", "add", probe, check=False)
    if done.returncode:
        return f"network namespaces are not allowed here: {done.stderr.strip()}"
    try:
        rules = _run("ip", "netns", "exec", probe, "iptables", "-L", "-n", check=False)
        if rules.returncode:
            return f"iptables does not work in a namespace here: {rules.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(index: int) -> None:
    """Remove fleet `index`'s links, namespaces and bridge (its processes must have ended). The veth
    pairs go first, at once: a namespace's own teardown removes them later, in the background."""
    links = _run("ip", "-o", "link", "show", check=False).stdout.splitlines()
    for line in links:
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(f"{PREFIX}{index}h"):
            _run("ip", "link", "del", name, check=False)
    listed = _run("ip", "netns", "list", check=False).stdout.split()
    for name in listed:
        if name.startswith(f"{PREFIX}{index}-"):
            _run("ip", "netns", "del", name, check=False)
    _run("ip", "link", "del", f"{PREFIX}{index}", check=False)
    with contextlib.suppress(FileNotFoundError):
        (STATE / str(index)).unlink()


def _remove_abandoned() -> None:
    if not STATE.exists():
        return
    for owner in STATE.iterdir():
        with contextlib.suppress(ValueError, OSError):
            if not _pid_alive(int(owner.read_text())):
                _remove(int(owner.name))


def _url_via(url: str, host: str, port: int) -> str:
    """`url` with its host and port replaced: the same service, reached through a host's proxy."""
    scheme, _, rest = url.partition("://")
    auth, _, location = rest.rpartition("@")
    path = location.partition("/")[2]
    return f"{scheme}://{auth + '@' if auth else ''}{host}:{port}/{path}"


@dataclass
class Host:
    """One namespace: its address on the bridge, and the ports of its proxy to each service."""

    fleet: Fleet
    name: str
    ip: str
    ports: dict[str, int]
    proxy: Process | None = None
    processes: list[Process] = field(default_factory=list)

    @property
    def netns(self) -> str:
        return f"{PREFIX}{self.fleet.index}-{self.name}"

    def env(self, **extra: str) -> dict[str, str]:
        """The settings of a process on this host: every service's URL through this host's proxy."""
        gateway = self.fleet.gateway
        return {
            "DATABASE_URL": _url_via(database_url(), gateway, self.ports["postgres"]),
            "CELERY_BROKER_URL": _url_via(settings.CELERY_BROKER_URL, gateway, self.ports["redis"]),
            "E2E_COUNTER_URL": _url_via(
                os.environ.get("E2E_COUNTER_URL", "redis://127.0.0.1:6379/9"), gateway, self.ports["redis"]
            ),
            "EVENTFLOW_HOST": self.name,
            **extra,
        }

    def worker(
        self,
        queues: list[str],
        *,
        concurrency: int = 2,
        name: str | None = None,
        env: dict[str, str] | None = None,
        clock_offset: float | None = None,
        args: list[str] | None = None,
        ready: bool = True,
    ) -> Worker:
        """A `celery worker` on this host, started and (unless `ready=False`) answering. A worker whose
        clock is off also consumes a queue of its own, `clock-<name>`, which its clock probe goes to."""
        name = name or self.name
        worker = Worker(
            name,
            [f"clock-{name}", *queues] if clock_offset is not None else queues,
            concurrency=concurrency,
            log_dir=self.fleet.log_dir,
            env=self.env(**(env or {})),
            clock_offset=clock_offset,
            netns=self.netns,
            args=args or [],
        )
        self.processes.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    def web(self, *, port: int = 8000, workers: int = 2, env: dict[str, str] | None = None) -> str:
        """gunicorn serving the app on this host; its base URL, once it answers."""
        import requests

        cmd = [
            *("ip", "netns", "exec", self.netns),
            *(sys.executable, "-m", "gunicorn", "config.wsgi:application"),
            *("-w", str(workers), "-b", f"{self.ip}:{port}", "--timeout", "120"),
        ]
        log_path = self.fleet.log_dir / f"{self.name}-web.log"
        server = Process(cmd, log_path=log_path, env=worker_env(**self.env(ALLOWED_HOSTS=self.ip, **(env or {}))))
        self.processes.append(server)
        url = f"http://{self.ip}:{port}"

        def serving() -> bool:
            if why := server.exited():
                raise AssertionError(why)
            try:
                return requests.get(f"{url}/api/", timeout=2).status_code < 500
            except requests.RequestException:
                return False

        wait_for(serving, timeout=60, interval=0.2, what=f"gunicorn on {self.name}")
        return url

    # ---------------------------------------------------------------- faults

    def _rules(self, action: str, service: str) -> None:
        gateway, port = self.fleet.gateway, str(self.ports[service])
        for chain, direction in (("OUTPUT", "--dport"), ("INPUT", "--sport")):
            address = "-d" if chain == "OUTPUT" else "-s"
            _run(
                *("ip", "netns", "exec", self.netns, "iptables", action, chain),
                *(address, gateway, "-p", "tcp", direction, port, "-j", "DROP"),
            )

    def cut(self, *services: str) -> None:
        """Drop every packet between this host and these services (all when none is named), both ways:
        connections stay open and hang, as across a partition."""
        for service in services or SERVICES:
            self._rules("-A", service)

    def mend(self, *services: str) -> None:
        """Undo `cut` for these services (all when none is named)."""
        for service in services or SERVICES:
            self._rules("-D", service)

    def lose(self, probability: float) -> None:
        """Drop this fraction of the packets this host sends and receives, at random."""
        for chain in ("OUTPUT", "INPUT"):
            _run(
                *("ip", "netns", "exec", self.netns, "iptables", "-A", chain, "-i" if chain == "INPUT" else "-o"),
                *("eth0", "-m", "statistic", "--mode", "random", "--probability", str(probability), "-j", "DROP"),
            )

    def stop(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop(timeout=10)
        if self.proxy is not None:
            self.proxy.stop(timeout=5)


class Fleet:
    """A bridge on the subnet 10.231.<index>.0/24, whose .1 is the machine, and hosts on it."""

    def __init__(self, log_dir: Path):
        if why := unavailable():
            raise Unavailable(why)
        _remove_abandoned()
        STATE.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.hosts: dict[str, Host] = {}
        # Claim the first free index: creating the bridge fails when another fleet has it.
        for index in range(1, 250):
            if _run("ip", "link", "add", f"{PREFIX}{index}", "type", "bridge", check=False).returncode == 0:
                self.index = index
                break
        else:
            raise RuntimeError("no free fleet index (250 bridges named efmh<N> exist)")
        (STATE / str(self.index)).write_text(str(os.getpid()))
        self.gateway = f"10.231.{self.index}.1"
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.index}"

    def host(self, name: str, *, delay_ms: float = 0.0) -> Host:
        """A new host `name` (a few letters), its services `delay_ms` away per round trip."""
        from tests.processes import free_port

        number = len(self.hosts) + 2
        host = Host(self, name, f"10.231.{self.index}.{number}", {service: free_port() for service in SERVICES})
        netns, outside = host.netns, f"{self.bridge}h{number}"
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "del", outside, check=False)  # one a namespace's teardown has not removed yet
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "link", "set", outside, "master", self.bridge, "up")
        _run("ip", "netns", "exec", netns, "ip", "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _run("ip", "netns", "exec", netns, "ip", "link", "set", "eth0", "up")
        _run("ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up")
        routes = [f"{self.gateway}:{host.ports[s]}={target}:{port}" for s, (target, port) in SERVICES.items()]
        cmd = [sys.executable, "-m", "tests.netproxy", "--delay-ms", str(delay_ms), *routes]
        host.proxy = Process(cmd, log_path=self.log_dir / f"{name}-proxy.log", env=dict(os.environ))
        wait_for(lambda: "listening" in host.proxy.log(), timeout=10, interval=0.05, what=f"{name}'s proxy")
        self.hosts[name] = host
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            host.stop()
        _remove(self.index)
