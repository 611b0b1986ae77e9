"""The Flower side of `vs_flower.py`: apps that run inside the Flower virtual environment.

Never imported by our package or our venv (it needs `flwr`). `vs_flower.py` copies this file
into a temporary Flower App directory (beside a generated `pyproject.toml`) for the deployment
runtime, and runs it as a script for the legacy runtime:

    python flower_apps.py legacy-server --port P --nodes N --params P --rounds R --timing FILE
    python flower_apps.py legacy-clients --port P --count C

`secagg_server_app` / `secagg_client_app` are the same workload through Flower's SecAgg+
(deployment runtime only; `benches/secure.py` runs them).

Workload, both runtimes: synchronous FedAvg over every node, fit (train) only, no evaluation;
"instant" clients return the arrays they got + 0.001 at once. Round boundaries are written as
JSON lines `{"event": "round_start" | "round_end", "round": r, "t": unix seconds}` to the timing
file by the server (the round ends when FedAvg has aggregated the replies: the committed
version), and `{"event": "done"}` when the strategy returns.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

DELTA = np.float32(0.001)


def _server_cpu_seconds() -> float:
    """CPU (user + system) of this process and its ancestors up to `flower-superlink`.

    The deployment runtime's server is SuperLink -> SuperExec -> ServerApp (this process): read
    at the event itself, the figure needs no sampling. Elsewhere: this process alone.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    chain, pid = [], os.getpid()
    for _ in range(6):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            break
        chain.append(int(stat[11]) + int(stat[12]))
        if b"flower-superlink" in cmdline:
            return sum(chain) / ticks
        pid = int(stat[1])
    return chain[0] / ticks if chain else 0.0


def _mark(path: str, event: str, **fields: object) -> None:
    record = {"event": event, "t": time.time(), "server_cpu_s": _server_cpu_seconds(), **fields}
    with open(path, "a") as out:
        out.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------ digits


def _digits_fit(
    data_file: str, partition: int, server_round: int, arrays: list[np.ndarray]
) -> tuple[list[np.ndarray], int]:
    """Local SGD as `metis_async.examples.digits.sgd` (softmax regression, L2 1e-4).

    A ClientApp is a fresh process per message, so the minibatch order is seeded by
    (seed + partition, round) instead of one generator kept across tasks.
    """
    data = np.load(data_file)
    x, y = data[f"x{partition}"], data[f"y{partition}"]
    steps, batch, lr, seed = data["train"]
    delay = float(data["delays"][partition])
    rng = np.random.default_rng([int(seed) + partition, server_round])
    w = arrays[0].astype(np.float64)
    order: list[int] = []
    for _ in range(int(steps)):
        if len(order) < int(batch):
            order += list(rng.permutation(y.size))
        idx, order = order[: int(batch)], order[int(batch) :]
        xb, yb = x[idx].astype(np.float64), y[idx]
        logits = xb @ w
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        probs[np.arange(yb.size), yb] -= 1.0
        w -= lr * (xb.T @ probs / yb.size + 1e-4 * w)
        if delay > 0:
            time.sleep(delay)
    return [w.astype(np.float32)], int(y.size)


# ------------------------------------------------------------------------------ deployment runtime
# Message API of flwr >= 1.21 (`flwr.serverapp`, `flwr.clientapp`); imported lazily so that the
# legacy runtime still runs where these modules are missing.


def _deployment_apps() -> tuple[object, object]:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        examples = 10
        if context.run_config["task"] == "digits":
            partition = int(context.node_config["partition-id"])
            server_round = int(msg.content["config"]["server-round"])
            arrays, examples = _digits_fit(
                str(context.run_config["data-file"]), partition, server_round, arrays
            )
        else:
            arrays = [a + DELTA for a in arrays]
        content = RecordDict(
            {
                "arrays": ArrayRecord(arrays),
                "metrics": MetricRecord({"num-examples": examples}),
            }
        )
        return Message(content=content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = int(context.run_config["num-nodes"])
        params = int(context.run_config["params"])
        rounds = int(context.run_config["rounds"])
        timing = str(context.run_config["timing-file"])

        class TimedFedAvg(FedAvg):  # type: ignore[misc]
            def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
                _mark(timing, "round_start", round=server_round)
                return super().configure_train(server_round, arrays, config, grid)

            def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
                replies = list(replies)
                ok = sum(1 for r in replies if r.has_content())
                result = super().aggregate_train(server_round, replies)
                _mark(timing, "round_end", round=server_round, replies=len(replies), ok=ok)
                return result

        strategy = TimedFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=nodes,
            min_evaluate_nodes=0,
            min_available_nodes=nodes,
        )
        evaluate_fn = None
        if context.run_config["task"] == "digits":
            data = np.load(str(context.run_config["data-file"]))
            test_x, test_y = data["test_x"], data["test_y"]
            initial = ArrayRecord([np.zeros((test_x.shape[1], 10), dtype=np.float32)])

            def evaluate_fn(server_round: int, arrays: ArrayRecord) -> None:
                if server_round > 0:
                    weights = arrays.to_numpy_ndarrays()[0].astype(np.float64)
                    hits = np.argmax(test_x.astype(np.float64) @ weights, axis=1) == test_y
                    _mark(timing, "accuracy", round=server_round, accuracy=float(hits.mean()))
        else:
            initial = ArrayRecord([np.zeros(params, dtype=np.float32)])
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=rounds,
            timeout=600,
            evaluate_fn=evaluate_fn,
        )
        _mark(timing, "done")

    return server, client


def _timed_legacy_fedavg(timing: str) -> type:
    """The legacy FedAvg, marking each round's start and end in the timing file."""
    from flwr.server.strategy import FedAvg

    class TimedFedAvg(FedAvg):  # type: ignore[misc]
        def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
            _mark(timing, "round_start", round=server_round)
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            out = super().aggregate_fit(server_round, results, failures)
            replies = len(results) + len(failures)
            _mark(timing, "round_end", round=server_round, replies=replies, ok=len(results))
            return out

    return TimedFedAvg


def _secagg_apps() -> tuple[object, object]:
    """Flower's SecAgg+ (`SecAggPlusWorkflow` on the server, `secaggplus_mod` on the clients)
    around the legacy FedAvg, as Flower's secaggplus example builds it; instant clients."""
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class Instant(NumPyClient):  # type: ignore[misc]
        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return [p + DELTA for p in parameters], 10, {}

    def client_fn(context: Context) -> object:
        return Instant().to_client()

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = int(context.run_config["num-nodes"])
        params = int(context.run_config["params"])
        rounds = int(context.run_config["rounds"])
        timing = str(context.run_config["timing-file"])

        TimedFedAvg = _timed_legacy_fedavg(timing)
        strategy = TimedFedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=nodes,
            min_evaluate_clients=0,
            min_available_clients=nodes,
            initial_parameters=ndarrays_to_parameters([np.zeros(params, dtype=np.float32)]),
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        secagg = SecAggPlusWorkflow(
            num_shares=int(context.run_config["secagg-shares"]),
            reconstruction_threshold=int(context.run_config["secagg-threshold"]),
        )
        DefaultWorkflow(fit_workflow=secagg)(grid, legacy)
        _mark(timing, "done")

    return server, client


try:
    server_app, client_app = _deployment_apps()
except ImportError:  # an old flwr without the Message API: only the legacy runtime
    server_app = client_app = None
try:
    secagg_server_app, secagg_client_app = _secagg_apps()
except ImportError:  # a flwr without SecAgg+ workflows
    secagg_server_app = secagg_client_app = None


# ------------------------------------------------------------------------------ legacy runtime


def legacy_server(args: argparse.Namespace) -> None:
    """`start_server` with the legacy FedAvg (deprecated since flwr 1.13)."""
    try:
        from flwr.compat.server.app import start_server
    except ImportError:
        from flwr.server import start_server  # type: ignore[attr-defined,no-redef]
    from flwr.server.server_config import ServerConfig

    try:
        from flwr.compat.common.parameter import ndarrays_to_parameters
    except ImportError:
        from flwr.common import ndarrays_to_parameters  # type: ignore[no-redef]

    timing = args.timing

    TimedFedAvg = _timed_legacy_fedavg(timing)

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=args.nodes,
        min_evaluate_clients=0,
        min_available_clients=args.nodes,
        initial_parameters=ndarrays_to_parameters([np.zeros(args.params, dtype=np.float32)]),
    )
    start_server(
        server_address=f"127.0.0.1:{args.port}",
        config=ServerConfig(num_rounds=args.rounds, round_timeout=600),
        strategy=strategy,
        grpc_max_message_length=1 << 30,
    )
    _mark(timing, "done")


def legacy_clients(args: argparse.Namespace) -> None:
    """`start_client` with a NumPyClient, `--count` of them as threads of this one process."""
    try:
        from flwr.compat.client.app import start_client
        from flwr.compat.client.numpy_client import NumPyClient
    except ImportError:
        from flwr.client import NumPyClient, start_client  # type: ignore[no-redef]

    class Instant(NumPyClient):  # type: ignore[misc]
        def get_parameters(self, config):  # type: ignore[no-untyped-def]
            return []

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return [p + DELTA for p in parameters], 10, {}

    def one() -> None:
        start_client(
            server_address=f"127.0.0.1:{args.port}",
            client=Instant().to_client(),
            insecure=True,
            grpc_max_message_length=1 << 30,
            max_retries=20,
            max_wait_time=120,
        )

    threads = [threading.Thread(target=one, daemon=True) for _ in range(args.count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + args.limit
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["legacy-server", "legacy-clients"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--params", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timing", default=str(Path("timing.jsonl")))
    parser.add_argument("--limit", type=float, default=900.0, help="seconds before giving up")
    args = parser.parse_args()
    if args.role == "legacy-server":
        legacy_server(args)
    else:
        legacy_clients(args)


if __name__ == "__main__":
    main()
