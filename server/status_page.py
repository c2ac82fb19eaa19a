"""The aggregator's status page: a small read-only HTML view of its task, served at ``/`` on
its metrics port, made from the same figures as ``truscl report``.

Everything shown is escaped: device addresses come from the journal, but reasons and states
are text, and the page must not trust any of it. No script, no form, no external resource.
"""

from __future__ import annotations

from html import escape

from truscl.metrics import MetricsServer, MetricsSettings, Page, metrics_page
from truscl.report import TaskFigures
from truscl.server.figures import TaskFigureReader

STYLE = (
    "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "td,th{border:1px solid #bbb;padding:.2em .6em;text-align:right}th{background:#eee}"
    "td.t{text-align:left;font-family:monospace}"
)


def status_server(
    reader: TaskFigureReader, settings: MetricsSettings, metrics: Page = metrics_page
) -> MetricsServer:
    """``/metrics`` (made by ``metrics``), and this page at ``/``, read afresh on each
    request."""

    def page() -> tuple[bytes, str]:
        return status_html(reader.read(), settings.explorer), "text/html; charset=utf-8"

    return MetricsServer(settings, {"/": page, "/metrics": metrics})


def status_html(figures: TaskFigures, explorer: str | None = None) -> bytes:
    """The page; ``explorer`` is a URL template with ``{tx}`` to link transactions to."""
    rounds = figures.rounds
    anchored = sum(1 for r in rounds if r.anchor_tx)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>truscl aggregator: task {_e(figures.task)}</title><style>{STYLE}</style>",
        "</head><body>",
        "<h1>truscl aggregator</h1>",
        f"<p>Task <code>{_e(figures.task)}</code>: {len(rounds)} of "
        f"{figures.rounds_planned} rounds, {anchored} anchored, "
        f"{len(figures.devices)} devices seen, "
        f"{sum(r.participants + r.late for r in rounds)} updates counted.</p>",
        "<h2>Rounds</h2><table><tr><th>round</th><th>state</th><th>participants</th>"
        "<th>late</th><th>rejections</th><th>bytes</th><th>gas</th><th>anchor</th></tr>",
    ]
    for r in rounds:
        parts.append(
            f"<tr><td>{r.round}</td><td class='t'>{_e(r.state)}</td><td>{r.participants}</td>"
            f"<td>{r.late}</td><td class='t'>{_reasons(r.rejections)}</td><td>{r.bytes}</td>"
            f"<td>{'' if r.gas is None else r.gas}</td>"
            f"<td class='t'>{_tx(r.anchor_tx, explorer)}</td></tr>"
        )
    parts.append(
        "</table><h2>Devices</h2><table><tr><th>device</th><th>updates</th>"
        "<th>last update (round)</th><th>epsilon</th></tr>"
    )
    for d in figures.devices:
        parts.append(
            f"<tr><td class='t'>{_e(d.address)}</td><td>{d.updates}</td>"
            f"<td>{d.last_round}</td><td>{d.epsilon:.3f}</td></tr>"
        )
    parts.append("</table><h2>Rejections</h2><table><tr><th>reason</th><th>count</th></tr>")
    for reason, count in sorted(figures.rejections.items()):
        parts.append(f"<tr><td class='t'>{_e(reason)}</td><td>{count}</td></tr>")
    if not figures.rejections:
        parts.append("<tr><td class='t'>none</td><td>0</td></tr>")
    parts.append("</table><p><a href='/metrics'>metrics</a></p></body></html>\n")
    return "".join(parts).encode()


def _e(text: str) -> str:
    return escape(text, quote=True)


def _reasons(counts: dict[str, int]) -> str:
    return _e(", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())))


def _tx(tx: str | None, explorer: str | None) -> str:
    if not tx:
        return ""
    if explorer is None:
        return _e(tx)
    return f"<a href='{_e(explorer.replace('{tx}', tx))}'>{_e(tx)}</a>"
