"""Running Flower for `vs_flower.py`: its environment, its processes, and what they cost.

- `ensure_flower_venv`: makes `benches/.flower-venv` on first use (flwr 1.42.0 needs a newer
  certifi than the registry has: its other requirements go in first with certifi pinned, then
  flwr with --no-deps; failing that, the newest flwr whose requirements resolve).
- `ProcessGroup`: every process started here, each in its own session; `stop()` ends each group
  and every descendant by PID (Flower's SuperExec runs in a session of its own), TERM then KILL.
- `TreeSampler`: peak RSS of process trees from /proc, sampled every 0.25 s (the server's CPU
  is read by the server itself at each round end: `flower_apps._mark`).
- `run_deployment` / `run_legacy` / `run_deployment_digits`: one measured Flower run each.

Every wait is bounded; a round that does not end in time is reported as stalled.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
APPS = BENCHES / "flower_apps.py"
FLWR_VERSION = "1.42.0"
CERTIFI_PIN = "certifi==2026.10.18"
FLOWER_NODE_BYTES = 600 * 10**6  # a SuperNode + SuperExec + ClientApp: 400 MB (PEERS.md), 580 here
PIP_LIMIT_S = 600.0
START_LIMIT_S = 60.0
PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------ environment


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(python), "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=PIP_LIMIT_S)


def _flwr_version(python: Path) -> str | None:
    try:
        done = subprocess.run(
            [str(python), "-c", "import flwr; print(flwr.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _requirements(wheel: Path) -> list[str]:
    """Requires-Dist lines of a wheel without extras, certifi replaced by the pin."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode()
    out = [CERTIFI_PIN]
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            requirement = line.split(":", 1)[1].strip()
            if not requirement.lower().startswith("certifi"):
                out.append(requirement)
    return out


def ensure_flower_venv(path: Path) -> dict[str, Any]:
    """The Flower environment: {python, version, status}; python is None where none works."""
    python = path / "bin" / "python"
    if python.exists() and (version := _flwr_version(python)):
        return {"python": str(python), "version": version, "status": f"flwr {version} (cached)"}
    try:
        subprocess.run(["python3", "-m", "venv", str(path)], check=True, timeout=120)
        with tempfile.TemporaryDirectory(prefix="flwr-wheel-") as tmp:
            got = _pip(python, "download", f"flwr=={FLWR_VERSION}", "--no-deps", "-d", tmp)
            wheels = list(Path(tmp).glob("flwr-*.whl"))
            if got.returncode == 0 and wheels:
                (Path(tmp) / "requirements.txt").write_text("\n".join(_requirements(wheels[0])))
                deps = _pip(python, "install", "-r", str(Path(tmp) / "requirements.txt"))
                if deps.returncode == 0:
                    _pip(python, "install", "--no-deps", str(wheels[0]))
        if version := _flwr_version(python):
            note = f"flwr {version} (deps with {CERTIFI_PIN}, flwr --no-deps)"
            return {"python": str(python), "version": version, "status": note}
        # The newest flwr whose requirements resolve here.
        _pip(python, "install", "flwr")
        if version := _flwr_version(python):
            note = f"flwr {version}: {FLWR_VERSION} did not install, newest that resolves"
            return {"python": str(python), "version": version, "status": note}
    except (subprocess.SubprocessError, OSError) as error:
        return {"python": None, "version": None, "status": f"no Flower: {error!r}"[:300]}
    return {"python": None, "version": None, "status": "no Flower: pip could not install flwr"}


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (bytes)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------ processes


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                out[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def descendants(roots: list[int], parents: dict[int, int] | None = None) -> list[int]:
    """`roots` and every process below them."""
    parents = _parents() if parents is None else parents
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [r for r in roots if r in parents]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class ProcessGroup:
    """Processes started here, each a session leader; `stop` ends them and their descendants."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, command: list[str], **popen: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(command, start_new_session=True, **popen)
        self.procs.append(proc)
        return proc

    def stop(self, grace_s: float = 5.0) -> None:
        tree = descendants([p.pid for p in self.procs if p.poll() is None])
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.procs:
                if proc.poll() is None:
                    with contextlib.suppress(OSError):
                        os.killpg(proc.pid, sig)
            for pid in tree:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                alive = [p for p in self.procs if p.poll() is None]
                alive_tree = [pid for pid in tree if Path(f"/proc/{pid}").exists()]
                if not alive and not [pid for pid in alive_tree if not _zombie(pid)]:
                    return
                time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


class TreeSampler:
    """Peak RSS (bytes) of named process trees, sampled every `every_s` on a thread."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.roots: dict[str, list[int]] = {}
        self.peak_rss: dict[str, int] = {}
        self._every = every_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, name: str, pid: int) -> None:
        self.roots.setdefault(name, []).append(pid)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stopped.wait(self._every):
            parents = _parents()
            for name, roots in list(self.roots.items()):
                rss = 0
                for pid in descendants(roots, parents):
                    try:
                        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    except OSError:
                        continue
                    rss += int(fields[21]) * PAGE
                self.peak_rss[name] = max(self.peak_rss.get(name, 0), rss)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, limit_s: float, proc: subprocess.Popen[Any]) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def _env(python: Path, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # loopback only: no telemetry events
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("VIRTUAL_ENV", None)
    return env


# ------------------------------------------------------------------------------ waiting on rounds


def _events(timing: Path) -> list[dict[str, Any]]:
    if not timing.exists():
        return []
    out = []
    for line in timing.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _follow_rounds(
    timing: Path,
    rounds: int,
    first_limit_s: float,
    round_limit_s: float,
    procs: list[subprocess.Popen[Any]],
    stop_on_accuracy: float | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Wait for `rounds` round ends; ('ok' | 'stalled: ...' | 'failed: ...', events)."""
    last_change = time.monotonic()
    seen = 0
    limit = first_limit_s
    while True:
        events = _events(timing)
        ends = [e for e in events if e["event"] == "round_end"]
        if stop_on_accuracy is not None and any(
            e["event"] == "accuracy" and e["accuracy"] >= stop_on_accuracy for e in events
        ):
            return "ok", events
        if len(ends) >= rounds or any(e["event"] == "done" for e in events):
            return ("ok" if len(ends) >= rounds else "failed: ended early"), events
        if len(ends) > seen:
            seen, last_change, limit = len(ends), time.monotonic(), round_limit_s
        if dead := [p.args[0] for p in procs if p.poll() not in (None, 0)]:
            return f"failed: {Path(str(dead[0])).name} exited", events
        if time.monotonic() - last_change > limit:
            return f"stalled: round {seen + 1} did not end within {limit:.0f} s", events
        time.sleep(0.25)


def _figures(
    events: list[dict[str, Any]], sampler: TreeSampler, started: float, rounds: int
) -> dict[str, Any]:
    ends = [e["t"] for e in events if e["event"] == "round_end"][:rounds]
    time.sleep(0.6)  # the sampler's peaks: let it pass the last round end
    steady = [b - a for a, b in itertools.pairwise(ends)]
    # CPU of the server tree as the server read it at each round end (flower_apps._mark).
    cpus = [e.get("server_cpu_s") for e in events if e["event"] == "round_end"][:rounds]
    cpu = None
    if len(ends) >= 2 and None not in (cpus[0], cpus[-1]):
        cpu = (cpus[-1] - cpus[0]) / (len(ends) - 1)
    lost = [e for e in events if e["event"] == "round_end" and e.get("ok") != e.get("replies")]
    return {
        "round_s": statistics.median(steady) if steady else None,
        "rounds_s": steady,
        "server_cpu_s_per_round": cpu,
        "server_rss_bytes": sampler.peak_rss.get("server"),
        "client_rss_bytes": sampler.peak_rss.get("clients"),
        "start_to_first_version_s": ends[0] - started if ends else None,
        "rounds_with_failed_replies": len(lost),
    }


# ------------------------------------------------------------------------------ deployment runtime


PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "vsflower"
version = "1.0.0"
description = "metis-async vs Flower benchmark app"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "metisbench"

[tool.flwr.app.components]
serverapp = "vsflower_app:{apps}server_app"
clientapp = "vsflower_app:{apps}client_app"

[tool.flwr.app.config]
task = "{task}"
num-nodes = {nodes}
params = {params}
rounds = {rounds}
timing-file = "{timing}"
data-file = "{data}"
secagg-shares = {shares}
secagg-threshold = {threshold}
"""

CONNECTION = """\
[superlink]
default = "bench"

[superlink.bench]
address = "127.0.0.1:{port}"
insecure = true
"""


def run_deployment(
    python: Path,
    nodes: int,
    params: int,
    rounds: int,
    task: str = "instant",
    data: Path | None = None,
    limit_s: float | None = None,
    stop_on_accuracy: float | None = None,
    secagg: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """flower-superlink + `nodes` flower-supernode + `flwr run`, measured; never raises.
    `secagg` (shares, threshold) runs the workload through Flower's SecAgg+ workflow."""
    group, sampler = ProcessGroup(), TreeSampler()
    tmp = Path(tempfile.mkdtemp(prefix="vs-flower-deploy-"))
    try:
        home, app, timing = tmp / "home", tmp / "app", tmp / "timing.jsonl"
        home.mkdir()
        app.mkdir()
        shutil.copy(APPS, app / "vsflower_app.py")
        (app / "pyproject.toml").write_text(
            PYPROJECT.format(
                task=task,
                nodes=nodes,
                params=params,
                rounds=rounds,
                timing=timing,
                data=data,
                apps="secagg_" if secagg else "",
                shares=secagg[0] if secagg else 0,
                threshold=secagg[1] if secagg else 0,
            )
        )
        port = _free_port()
        (home / "config.toml").write_text(CONNECTION.format(port=port))
        env, bin_ = _env(python, home), python.parent
        started = time.time()
        superlink_log = open(tmp / "superlink.log", "w")  # noqa: SIM115 (closed with tmp)
        superlink = group.start(
            [
                str(bin_ / "flower-superlink"),
                "--insecure",
                "--database",
                str(tmp / "state.db"),  # :memory: breaks the first round (PEERS.md)
                "--disable-runtime-dependency-installation",
                "--port",
                str(port),
            ],
            env=env,
            stdout=superlink_log,
            stderr=subprocess.STDOUT,
        )
        sampler.watch("server", superlink.pid)
        if not _wait_port(port, START_LIMIT_S, superlink):
            return {"status": "failed: SuperLink did not listen", "runtime": "deployment"}
        procs = [superlink]
        for i in range(nodes):
            node = group.start(
                [
                    str(bin_ / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(_free_port()),  # its own Runtime API port (PEERS.md)
                    "--node-config",
                    f"partition-id={i}",
                    "--max-wait-time",
                    "120",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            sampler.watch("clients", node.pid)
            procs.append(node)
        run = subprocess.run(
            [str(bin_ / "flwr"), "run", str(app), "bench"],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_LIMIT_S + nodes,
        )
        if run.returncode != 0:
            return {"status": f"failed: flwr run: {run.stdout[-300:]}", "runtime": "deployment"}
        # Round 1 waits for every SuperNode to register (2-core box: ~1 s of CPU each).
        first_limit = limit_s or 120.0 + 3.0 * nodes + params / 1e6 * nodes * 0.5
        round_limit = limit_s or 60.0 + 1.5 * nodes + params / 1e6 * nodes * 0.5
        status, events = _follow_rounds(
            timing, rounds, first_limit, round_limit, procs, stop_on_accuracy
        )
        superlink_log.flush()
        log = (tmp / "superlink.log").read_text(errors="replace")
        if status != "ok" and "database is locked" in log:
            status += ' (SuperLink logged SQLite "database is locked")'
        out = {
            "status": status,
            "runtime": "deployment",
            **_figures(events, sampler, started, rounds),
        }
        out["events"] = [e for e in events if e["event"] == "accuracy"] or None
        return out
    except (subprocess.SubprocessError, OSError) as error:
        return {"status": f"failed: {error!r}"[:300], "runtime": "deployment"}
    finally:
        sampler.stop()
        group.stop()
        if not os.environ.get("KEEP_FLOWER_TMP"):  # set it to read the logs of a failed run
            shutil.rmtree(tmp, ignore_errors=True)


def run_deployment_digits(python: Path, limit_s: float) -> dict[str, Any]:
    """Digits, 10 SuperNodes, synchronous FedAvg, until 0.90 test accuracy (or 15 rounds)."""
    import numpy as np

    from metis_async.demo import DemoOptions
    from metis_async.examples import digits

    options = DemoOptions(stragglers=0.1, slowdown=10.0)
    federation = digits.load_digits_federated(options.learners, options.alpha, options.seed)
    arrays: dict[str, Any] = {"test_x": federation.test[0], "test_y": federation.test[1]}
    for i, (x, y) in enumerate(federation.partitions):
        arrays[f"x{i}"], arrays[f"y{i}"] = x, y
    arrays["delays"] = np.asarray(options.step_delays())
    arrays["train"] = np.asarray(
        [options.local_steps, options.batch_size, options.learning_rate, options.seed]
    )
    with tempfile.TemporaryDirectory(prefix="vs-flower-digits-") as tmp:
        data = Path(tmp) / "digits.npz"
        np.savez(data, **arrays)
        started = time.time()
        out = run_deployment(
            python, options.learners, 0, 15, "digits", data, limit_s / 3, stop_on_accuracy=0.90
        )
    reached = [e for e in out.get("events") or [] if e["accuracy"] >= 0.90]
    out["seconds_to_90"] = reached[0]["t"] - started if reached else None
    out["accuracy_history"] = [round(e["accuracy"], 4) for e in out.get("events") or []]
    if out["status"] == "ok" and not reached:
        out["status"] = "0.90 not reached in 15 rounds"
    for key in ("events", "round_s", "rounds_s", "server_cpu_s_per_round"):
        out.pop(key, None)
    return out


# ------------------------------------------------------------------------------ legacy runtime


def run_legacy(python: Path, nodes: int, params: int, rounds: int) -> dict[str, Any]:
    """flwr.compat start_server + start_client (threads of two processes), measured."""
    group, sampler = ProcessGroup(), TreeSampler()
    tmp = Path(tempfile.mkdtemp(prefix="vs-flower-legacy-"))
    try:
        timing, port = tmp / "timing.jsonl", _free_port()
        env = _env(python, tmp)
        started = time.time()
        server = group.start(
            [
                str(python),
                str(APPS),
                "legacy-server",
                "--port",
                str(port),
                "--nodes",
                str(nodes),
                "--params",
                str(params),
                "--rounds",
                str(rounds),
                "--timing",
                str(timing),
            ],
            env=env,
            stdout=open(tmp / "server.log", "w"),  # noqa: SIM115 (closed with the process)
            stderr=subprocess.STDOUT,
        )
        sampler.watch("server", server.pid)
        if not _wait_port(port, START_LIMIT_S, server):
            log = (tmp / "server.log").read_text(errors="replace")[-300:]
            return {"status": f"failed: start_server did not listen: {log}", "runtime": "legacy"}
        procs = [server]
        per = -(-nodes // 2)
        for first in range(0, nodes, per):
            clients = group.start(
                [
                    str(python),
                    str(APPS),
                    "legacy-clients",
                    "--port",
                    str(port),
                    "--count",
                    str(min(per, nodes - first)),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            sampler.watch("clients", clients.pid)
            procs.append(clients)
        first_limit = 60.0 + nodes + params / 1e6 * nodes * 0.5
        round_limit = 60.0 + params / 1e6 * nodes * 0.5
        status, events = _follow_rounds(timing, rounds, first_limit, round_limit, procs)
        return {"status": status, "runtime": "legacy", **_figures(events, sampler, started, rounds)}
    except (subprocess.SubprocessError, OSError) as error:
        return {"status": f"failed: {error!r}"[:300], "runtime": "legacy"}
    finally:
        sampler.stop()
        group.stop()
        if not os.environ.get("KEEP_FLOWER_TMP"):  # set it to read the logs of a failed run
            shutil.rmtree(tmp, ignore_errors=True)
