"""The controller's live dashboard: a web page on its own port, behind the admin token.

It shows what a run is doing while it runs — learners, versions, evaluation curves, staleness,
rates, rejections, who contributes — from a `DashboardSource` (shapes in
`metis_async.dashboard.source`), pushed to the page by server-sent events. Aggregates only: the
learner table is paged and sorted by the source, so 100,000 learners cost the page nothing.

    from metis_async.dashboard import Dashboard
    port = await Dashboard(source, token=admin_token, port=8080).start()

Importing this package is cheap; aiohttp is imported by `Dashboard.start()`.
"""

from __future__ import annotations

from metis_async.dashboard.server import Dashboard
from metis_async.dashboard.source import (
    MAX_PAGE,
    SORT_KEYS,
    DashboardSource,
    empty_summary,
    learner_page,
)

__all__ = [
    "MAX_PAGE",
    "SORT_KEYS",
    "Dashboard",
    "DashboardSource",
    "empty_summary",
    "learner_page",
]
