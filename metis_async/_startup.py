"""Imported first by the controller's entry points (`metis_async.cli`, the ingest workers).

structlog imports rich, when it is installed (the demo's progress bars need it), for pretty
tracebacks: ~50 ms of every controller start, measured on a 2-core VM, for a formatter our log
chain never calls (`telemetry.configure_logging` formats exceptions with `format_exc_info`
before any renderer). Importing structlog here with rich hidden for that one import keeps the
start short; rich itself stays importable afterwards (the CLI's tables and the demo use it).
Only our own processes do this: a program that embeds the learner never imports this module.

pydantic looks for plugins when it builds the settings schema: `importlib.metadata` lists
every directory on `sys.path` and reads every installed distribution's entry points, ~25 ms of
a start on the same VM (start to first version with ten waiting learners, 8 interleaved runs:
median 0.49 -> 0.44 s, benches/README.md). The controller uses no pydantic plugin, so its
processes set `PYDANTIC_DISABLE_PLUGINS`, pydantic's own switch, unless the environment
already says otherwise (set it to a list of plugin names to disable, or to an empty value, to
have plugins load).

The garbage collector's thresholds are raised here too (`runtime.SERVING_GC_THRESHOLDS`): a
start is a burst of long-lived objects (modules, classes, protobuf descriptors, the settings
schema) that the default thresholds scan over and over; the serving loop raises them anyway.
"""

from __future__ import annotations

import os
import sys

from metis_async import runtime


def _import_structlog_without_rich() -> None:
    if "structlog" in sys.modules or "rich" in sys.modules:
        return  # too late or not needed: structlog keeps what it found
    sys.modules["rich"] = None  # type: ignore[assignment]  # makes `import rich` fail
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


_import_structlog_without_rich()
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "1")  # before the settings schema is built
runtime.tune_collector_for_serving()
