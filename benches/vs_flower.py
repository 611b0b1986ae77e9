"""The same workload on Flower and on metis-async, side by side in one run.

    python benches/vs_flower.py [--quick | --configs 10x100K,40x1M] [--rounds R]
                                [--runtimes deployment,legacy] [--no-digits] [--json]

Workload: N "instant" learners (each answers a train task at once with the arrays it got +
0.001; ours send the fixed delta, `benches/load.py`), synchronous FedAvg over all N, fit only,
a model of P float32, R rounds. Sets: `--quick` 10x100K, 10x1M, 40x100K; default 10x{100K,1M,10M}
and 40x{100K,1M}; `--configs all` every N in (10, 40, 100, 1000) x P in (100K, 1M, 10M).

Flower runs in its own virtual environment, `benches/.flower-venv`, made on first use
(`flwr==1.42.0` with its dependencies and `certifi==2026.10.18`, the newest here; else the newest
flwr whose requirements resolve). Two Flower runtimes, labelled:
- `deployment`: `flower-superlink` (file database), one `flower-supernode` per learner, and
  `flwr run` of a tiny Flower App (`benches/flower_apps.py` + a generated pyproject.toml);
- `legacy`: the deprecated `start_server` / `start_client` (`flwr.compat`), clients as threads of
  two processes.
Ours: `benches/load.py`'s run (`metis-async serve` + load processes), imported.

Measured per configuration and system: `round_s` (median of rounds 2..R, round = one committed
version to the next), `server_cpu_s_per_round` (user + system CPU of the server's process tree
over rounds 2..R: SuperLink + SuperExec + ServerApp; the start_server process; our controller),
`server_rss_bytes` (peak of the tree), `start_to_first_version_s` (from starting the server to
the end of round 1), for Flower also `client_rss_bytes` (peak, all client processes). Flower is
skipped where N x 600 MB (a SuperNode and its processes; 580 MB measured here, 400 in
PEERS.md) does not fit the available memory.

Also (unless `--no-digits`): seconds to 0.90 test accuracy on the digits task with 10% of the
learners 10x slower: our buffered policy (`metis-async demo --protocol buffered`) against Flower
synchronous FedAvg (deployment runtime) on the same split, steps and step delays.

Every phase has a time limit; a Flower run whose next round does not end in time is reported as
stalled (with "database is locked" if the SuperLink logged it). Processes started here are ended
by process group (and their descendants by PID) on exit, errors and timeouts. Traffic is loopback.
With --json the last line is one JSON object, also written to benches/results/vs_flower.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flower_runtime import (  # benches/, beside this script
    FLOWER_NODE_BYTES,
    ProcessGroup,
    available_memory_bytes,
    ensure_flower_venv,
    run_deployment,
    run_deployment_digits,
    run_legacy,
)

BENCHES = Path(__file__).resolve().parent
REPO = BENCHES.parent
RESULTS = BENCHES / "results" / "vs_flower.json"
SIZES = {"100K": 100_000, "1M": 1_000_000, "10M": 10_000_000}
QUICK = ["10x100K", "10x1M", "40x100K"]
DEFAULT = ["10x100K", "10x1M", "10x10M", "40x100K", "40x1M"]
ALL = [f"{n}x{p}" for n in (10, 40, 100, 1000) for p in SIZES]
OURS_LIMIT_S = 300.0
DIGITS_LIMIT_S = 300.0


# ------------------------------------------------------------------------------ ours


def controller_start_seconds(params: int) -> float | None:
    """Seconds from launching `metis-async serve` (a P-float32 model) until it listens."""
    # The installed command beside this interpreter, run from a temporary directory: a source
    # checkout in the working directory must not shadow the installed (built) package.
    exe = Path(sys.executable).with_name("metis-async")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "metis_async.cli"]
    group = ProcessGroup()
    with tempfile.TemporaryDirectory(prefix="vs-flower-serve-") as tmp:
        import numpy as np

        model = Path(tmp) / "model.npz"
        np.savez(model, np.zeros(params, dtype=np.float32))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        started = time.monotonic()
        try:
            group.start(
                [*cli, "serve", "--port", str(port), "--init-model", str(model), "--rounds", "1"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=tmp,
            )
            while time.monotonic() - started < 60:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        return time.monotonic() - started
                time.sleep(0.05)
            return None
        finally:
            group.stop()


def run_ours(learners: int, params: int, rounds: int) -> dict[str, Any]:
    """benches/load.py as a subprocess (`--json`: its last stdout line), plus start to v1.

    load.py starts its learners once the controller listens and reports the phases after that;
    start to the first committed version = the controller's own start (measured here apart) +
    start to all welcomed + the first broadcast + round 1's training, upload and commit
    (a steady round less its broadcast).
    """
    # load.py samples the controller every 0.2 s and waits until it saw every stream held: a
    # run over before the first sample would wait out its 900 s limit. So ours runs enough
    # rounds to last ~3 s (the median of rounds 2..R stays a steady-round figure).
    estimate = 0.01 + learners * params * 4 / 2e8
    rounds = max(rounds, min(200, int(3.0 / estimate) + 1))
    command = [sys.executable, str(BENCHES / "load.py"), "--learners", str(learners)]
    command += ["--params", str(params), "--rounds", str(rounds), "--json"]
    group = ProcessGroup()
    try:
        proc = group.start(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = proc.communicate(timeout=OURS_LIMIT_S)
    except subprocess.TimeoutExpired:
        return {"status": f"stalled: load.py did not finish within {OURS_LIMIT_S:.0f} s"}
    finally:
        group.stop()
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"status": f"failed: load.py rc {proc.returncode}: {stderr[-300:]}"}
    first_version = None
    parts = [
        controller_start_seconds(params),
        result.get("start_to_all_welcomed_seconds"),
        result.get("first_broadcast_seconds"),
        result.get("round_seconds"),
    ]
    if None not in parts:
        serve, welcomed, broadcast, round_s = parts
        first_version = serve + welcomed + broadcast + round_s - (result["broadcast_seconds"] or 0)
    complete = result.get("round_seconds") is not None and result.get("errors") == 0
    return {
        "status": "ok" if complete else f"incomplete: {result.get('first_errors')}",
        "round_s": result.get("round_seconds"),
        "server_cpu_s_per_round": result.get("cpu_seconds_per_round"),
        "server_rss_bytes": result.get("controller_peak_rss_bytes")
        or result.get("controller_rss_bytes"),
        "start_to_first_version_s": first_version,
        "start_to_first_version_note": "controller start + load.py phases (see run_ours)",
        "connect_s": result.get("connect_seconds"),
        "rounds": rounds,
    }


# ------------------------------------------------------------------------------ the run


def parse_configs(text: str) -> list[tuple[int, int, str]]:
    """'10x100K,40x1M' -> [(10, 100000, '10x100K'), ...]."""
    out = []
    for item in text.split(","):
        n, p = item.strip().split("x")
        out.append((int(n), SIZES[p.upper()], f"{int(n)}x{p.upper()}"))
    return out


def run_config(
    flower_python: Path | None, learners: int, params: int, rounds: int, runtimes: list[str]
) -> dict[str, Any]:
    """One configuration on every runtime: Flower's first, then ours (one at a time)."""
    row: dict[str, Any] = {"learners": learners, "params": params, "rounds": rounds}
    need = learners * FLOWER_NODE_BYTES + (1 << 30)
    free = available_memory_bytes()
    for runtime in runtimes:
        if flower_python is None:
            row[runtime] = {"status": "skipped: no Flower environment"}
        elif runtime == "deployment" and need > free:
            row[runtime] = {
                "status": f"skipped: needs ~{need / 1e9:.1f} GB "
                f"({learners} x {FLOWER_NODE_BYTES / 1e6:.0f} MB per SuperNode), "
                f"{free / 1e9:.1f} GB available"
            }
        else:
            print(f"[{learners}x{params:,}] Flower {runtime} ...", file=sys.stderr, flush=True)
            runner = run_deployment if runtime == "deployment" else run_legacy
            row[runtime] = runner(flower_python, learners, params, rounds)
    print(f"[{learners}x{params:,}] metis-async ...", file=sys.stderr, flush=True)
    try:
        row["ours"] = run_ours(learners, params, rounds)
    except Exception as error:  # report it, go on with the next configuration
        row["ours"] = {"status": f"failed: {error!r}"[:300]}
    ours = row["ours"].get("round_s")
    for runtime in runtimes:
        flower = row[runtime].get("round_s")
        row[runtime]["ratio"] = flower / ours if flower and ours else None
    return row


def run_digits(flower_python: Path | None) -> dict[str, Any]:
    """Seconds to 0.90 on digits, 10% stragglers x10: Flower sync FedAvg vs our buffered."""
    out: dict[str, Any] = {"task": "digits, 10 learners, Dirichlet 0.5, 10% stragglers x10"}
    exe = Path(sys.executable).with_name("metis-async")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "metis_async.cli"]
    ours: dict[str, Any] = {}
    for protocol in ("buffered", "synchronous"):
        print(f"[digits] metis-async {protocol} ...", file=sys.stderr, flush=True)
        command = [*cli, "demo", "--protocol", protocol, "--stragglers", "0.1"]
        command += ["--slowdown", "10", "--json", "--no-progress"]
        group = ProcessGroup()
        try:
            proc = group.start(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                cwd=tempfile.gettempdir(),  # not a source checkout that would shadow the package
            )
            stdout, _ = proc.communicate(timeout=DIGITS_LIMIT_S)
            demo = json.loads(stdout.strip().splitlines()[-1])
            ours[protocol] = {
                "status": "ok",
                "seconds_to_90": demo["seconds_to_90"],
                "final_accuracy": demo["final_accuracy"],
                "versions": demo["versions"],
                "wall_s": demo["wall_seconds"],
            }
        except subprocess.TimeoutExpired:
            ours[protocol] = {"status": f"timed out after {DIGITS_LIMIT_S:.0f} s"}
        except (ValueError, KeyError, IndexError) as error:
            ours[protocol] = {"status": f"failed: {error!r}"[:300]}
        finally:
            group.stop()
    out["ours"] = ours
    if flower_python is None:
        out["flower"] = {"status": "not measured: no Flower environment"}
    else:
        print("[digits] Flower deployment, synchronous FedAvg ...", file=sys.stderr, flush=True)
        out["flower"] = run_deployment_digits(flower_python, DIGITS_LIMIT_S)
    a = out["flower"].get("seconds_to_90")
    b = ours.get("buffered", {}).get("seconds_to_90")
    out["ratio_flower_sync_over_ours_buffered"] = a / b if a and b else None
    return out


def _fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "-"
    if unit == "GB":
        return f"{value / 1e9:.2f}"
    return f"{value:.{digits}f}"


def print_table(result: dict[str, Any]) -> None:
    runtimes = result["runtimes"]
    print(f"\nmetis-async vs Flower {result['flwr_version']} ({result['machine']['summary']})")
    print(f"date {result['date']}; {result['note']}\n")
    head = "| config | system | round s | server CPU s/round | server RSS GB |"
    print(head + " start → v1 s | client RSS GB | flower/ours round | status |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for row in result["configurations"]:
        name = f"{row['learners']} x {row['params']:,}"
        for system in [*runtimes, "ours"]:
            r = row[system]
            label = "metis-async" if system == "ours" else f"Flower {system}"
            ratio = f"{r['ratio']:.1f}x" if r.get("ratio") else "-"
            print(
                f"| {name} | {label} | {_fmt(r.get('round_s'), digits=3)} | "
                f"{_fmt(r.get('server_cpu_s_per_round'), digits=3)} | "
                f"{_fmt(r.get('server_rss_bytes'), 'GB')} | "
                f"{_fmt(r.get('start_to_first_version_s'), digits=1)} | "
                f"{_fmt(r.get('client_rss_bytes'), 'GB')} | "
                f"{ratio if system != 'ours' else ''} | {r.get('status', '')} |"
            )
    digits = result.get("digits")
    if digits:
        print(f"\ndigits: {digits['task']}; seconds to 0.90 test accuracy")
        for name, r in [("Flower sync FedAvg", digits["flower"])] + [
            (f"metis-async {p}", r) for p, r in digits["ours"].items()
        ]:
            print(f"  {name:24s} {_fmt(r.get('seconds_to_90'), digits=1):>8s}  {r['status']}")
        ratio = digits.get("ratio_flower_sync_over_ours_buffered")
        print(f"  Flower sync / our buffered: {_fmt(ratio, digits=1)}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--configs", help="comma list like 10x100K,40x1M, or 'all'")
    parser.add_argument("--rounds", type=int, default=3, help="R: rounds per run (>= 3)")
    parser.add_argument("--runtimes", default="deployment,legacy", help="Flower runtimes")
    parser.add_argument("--no-digits", action="store_true", help="skip time to 0.90 on digits")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (steady rounds are 2..R)")
    chosen = args.configs or ",".join(QUICK if args.quick else DEFAULT)
    configs = parse_configs(",".join(ALL) if chosen == "all" else chosen)
    runtimes = [r for r in args.runtimes.split(",") if r]
    if set(runtimes) - {"deployment", "legacy"}:
        parser.error("--runtimes takes deployment and/or legacy")
    # SIGTERM runs the finally blocks (process groups ended) like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    print("Flower environment ...", file=sys.stderr, flush=True)
    flower = ensure_flower_venv(BENCHES / ".flower-venv")
    print(f"Flower: {flower['status']}", file=sys.stderr, flush=True)
    python = Path(flower["python"]) if flower.get("python") else None
    rows = [run_config(python, n, p, args.rounds, runtimes) for n, p, _ in configs]
    result: dict[str, Any] = {
        "benchmark": "vs_flower",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benches/vs_flower.py", *sys.argv[1:]]),
        "flwr_version": flower.get("version"),
        "flower_env": flower["status"],
        "runtimes": runtimes,
        "runtime_labels": {
            "deployment": "flower-superlink + flower-supernode per learner + flwr run",
            "legacy": "flwr.compat start_server/start_client (deprecated), threads",
            "ours": "metis-async serve (synchronous) + benches/load.py instant learners",
        },
        "machine": _machine(),
        "note": (
            "CPU figures are noisy: a shared 2-core box where other engineers run tests; "
            "clients and server share the same cores"
        ),
        "configurations": rows,
    }
    if not args.no_digits:
        result["digits"] = run_digits(python)
    for row in rows:
        row["flower_round_s"] = {r: row[r].get("round_s") for r in runtimes}
        row["ours_round_s"] = row["ours"].get("round_s")
        row["ratio"] = {r: row[r].get("ratio") for r in runtimes}
    print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))


def _machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "summary": f"{os.cpu_count()} cores, {cpu}, {total / 2**30:.0f} GiB",
    }


if __name__ == "__main__":
    main()
