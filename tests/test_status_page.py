"""The aggregator's status page: escaped, and read by a real browser (headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_aggregator import Deployment, deployment
from test_metrics import a_round_with_a_forgery

from truscl.metrics import MetricsSettings
from truscl.report import DeviceFigures, RoundFigures, TaskFigures
from truscl.server.archive import Archive
from truscl.server.figures import TaskFigureReader
from truscl.server.status_page import status_html, status_server

__all__ = ["deployment"]  # the aggregator on a real broker and the in-process EVM

EXPLORER = "https://explorer.example/tx/{tx}"
PNG = b"\x89PNG\r\n\x1a\n"


class PageText(HTMLParser):
    """The text a reader sees, and the links, of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []
        self.links: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._hidden += tag in ("style", "script", "title")
        self.links += [value or "" for name, value in attrs if tag == "a" and name == "href"]

    def handle_endtag(self, tag: str) -> None:
        self._hidden -= tag in ("style", "script", "title")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.chunks.append(data)

    @classmethod
    def of(cls, html: str) -> PageText:
        page = cls()
        page.feed(html)
        return page

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.chunks).split())


def test_the_page_escapes_what_it_did_not_write() -> None:
    # Prepare: strings a hostile party could have put where the page shows text
    hostile = "<script>alert(1)</script>"
    figures = TaskFigures(
        task="0x" + "ab" * 32,
        rounds_planned=2,
        rounds=(RoundFigures(1, "delivered", 1, rejections={hostile: 1}, anchor_tx="0x'><b>x"),),
        devices=(DeviceFigures("<img src=x onerror=alert(1)>", 1, 1, 0.5, ((1, 0.5),)),),
        rejections={hostile: 1},
        accuracy_note="",
    )
    # Execute
    html = status_html(figures, EXPLORER).decode()
    # Assert: no markup of theirs, their text shown as text, the link still one link
    assert "<script>" not in html and "<img" not in html and "<b>" not in html
    page = PageText.of(html)
    assert hostile in page.text and "<img src=x onerror=alert(1)>" in page.text
    assert page.links == ["https://explorer.example/tx/0x'><b>x", "/metrics"]


def chromium(url: str, folder: Path) -> tuple[str, Path]:
    """The page's DOM after load, and a screenshot, from headless Chromium."""
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("Debian's chromium is not installed: scripts/setup with dev installs it")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={folder / 'profile'}",
             "--window-size=1280,900"]  # fmt: skip
    dom = subprocess.run(
        [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    shot = folder / "status.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True
    )
    return dom, shot


@pytest.mark.slow
def test_a_browser_shows_the_rounds_devices_anchors_and_rejections(
    deployment: Deployment, tmp_path: Path
) -> None:
    # Prepare: the page as the aggregator serves it, after a round with a forgery in it
    d = deployment
    reader = TaskFigureReader(d.chain, Archive(d.archive), d.spec.task)
    with status_server(reader, MetricsSettings(port=0, explorer=EXPLORER)) as server:
        a_round_with_a_forgery(d)
        tx = d.aggregator.stats[1].anchor_tx
        # Execute
        dom, shot = chromium(f"http://127.0.0.1:{server.port}/", tmp_path)
    # Assert: what a person reading the page sees
    assert shot.read_bytes().startswith(PNG) and shot.stat().st_size > 10_000
    page = PageText.of(dom)
    assert f"Task {d.spec.task}" in page.text
    assert "of 2 rounds, 1 anchored, 2 devices seen, 2 updates counted" in page.text
    row = rf"1 (anchored|delivered) 2 0 bad-signature 1 [1-9]\d* [1-9]\d* {tx}"
    assert re.search(row, page.text), page.text  # round, state, counted, late, refusals, ...
    honest, other, _ = d.devices
    for device in (honest, other):
        assert f"{device.address} 1 1 0.000" in page.text  # 1 update, in round 1, epsilon 1e-6
    assert EXPLORER.format(tx=tx) in page.links
    assert "Rejections reason count bad-signature 1" in page.text
