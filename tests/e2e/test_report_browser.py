"""A report as a browser shows it: headless Chromium loads the page from a local server that sends
it with the API's Content-Security-Policy, and the test reads the page over the DevTools protocol
(aiohttp's websocket client, a core dependency): every image decodes, nothing outside the page and
its data URIs is requested, the policy blocks nothing, and the page fits the window's width.

Skipped only where Chromium is missing outside CI; CI installs it (.ci/run)."""

import asyncio
import json
import math
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from service.report import Trial, build_report, render_html
from service.report.page import CONTENT_SECURITY_POLICY

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                 reason="no Chromium here (CI installs it: .ci/run)")]
WIDTH = 1280


def page_html() -> str:
    """A report of 6 groups x 3 seeds, one with a failed trial, two metrics."""
    trials: list[Trial] = []
    for g, (opt, lr) in enumerate([(o, lr) for o in ("adamw", "sgd", "lion") for lr in ("0.01", "0.1")]):
        for seed in range(3):
            params = {"optimizer.name": opt, "optimizer.lr": lr, "train.seed": str(seed),
                      "sweep.optimizer.name": opt, "sweep.optimizer.lr": lr, "sweep.train.seed": str(seed)}
            loss = [(s, 2.0 * math.exp(-s / (20 + 10 * g)) + 0.02 * seed) for s in range(0, 200, 5)]
            acc = [(s, 1 - loss[i][1] / 2.5) for i, (s, _) in enumerate(loss) if s % 50 == 0]
            history = {"train/loss": loss, "eval/accuracy": acc}
            trials.append(Trial(run_id=f"{len(trials):032x}", name=f"t{len(trials)}", params=params, history=history,
                                latest={k: v[-1][1] for k, v in history.items()}, parent_id="p" * 32,
                                status="FAILED" if (g, seed) == (5, 2) else "FINISHED"))
    report = build_report(trials, ["train/loss", "eval/accuracy"])
    return render_html(report, title="Optimizers over seeds", sections=[("Claims", "<p>a caller's section</p>")])


@pytest.fixture()
def served() -> Iterator[str]:
    """The page at http://127.0.0.1:PORT/report, with the API's headers; 404 for anything else."""
    body = page_html().encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path != "/report":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/report"
    finally:
        server.shutdown()
        server.server_close()


class DevTools:
    """The few calls of the DevTools protocol the test needs, over one page's websocket."""

    def __init__(self, ws: Any) -> None:
        self.ws, self.next_id = ws, 0
        self.events: list[dict[str, Any]] = []  # what arrived while waiting for a reply

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self.ws.receive(timeout=60)).data)
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]  # type: ignore[no-any-return]
            self.events.append(message)

    async def until(self, event: str) -> None:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(json.loads((await self.ws.receive(timeout=60)).data))


IMAGES = """Promise.all(Array.from(document.images).map(img => img.decode().then(
    () => [img.naturalWidth, img.naturalHeight], () => [0, 0])))"""


async def inspect(url: str, port: int) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        target = next(t for t in targets if t["type"] == "page")
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tools = DevTools(ws)
            for domain in ("Page", "Network", "Log"):
                await tools.call(f"{domain}.enable")
            await tools.call("Page.navigate", url=url)
            await tools.until("Page.loadEventFired")
            images = await tools.call("Runtime.evaluate", expression=IMAGES, awaitPromise=True, returnByValue=True)
            fits = await tools.call("Runtime.evaluate", returnByValue=True,
                                    expression="document.documentElement.scrollWidth <= window.innerWidth")
    requested = [e["params"]["request"]["url"] for e in tools.events if e.get("method") == "Network.requestWillBeSent"]
    logged = [e["params"]["entry"] for e in tools.events if e.get("method") == "Log.entryAdded"]
    return {"images": images["result"]["value"], "fits": fits["result"]["value"], "requested": requested,
            "logged": logged}


def test_every_image_decodes_and_nothing_is_fetched(served: str, tmp_path: Path) -> None:
    assert CHROMIUM is not None, "Chromium is required in CI (.ci/run installs it)"
    profile = tmp_path / "profile"
    log = open(tmp_path / "chromium.log", "wb")
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--no-first-run", "--disable-extensions", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", f"--window-size={WIDTH},900", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        active = profile / "DevToolsActivePort"  # Chromium writes its port here once it listens
        deadline = time.monotonic() + 60
        while not (active.exists() and active.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "chromium.log").read_text()[-3000:]
            time.sleep(0.1)
        seen = asyncio.run(inspect(served, int(active.read_text().split()[0])))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert len(seen["images"]) == 2, seen
    assert all(w > 300 and h > 200 for w, h in seen["images"]), seen["images"]
    assert [u for u in seen["requested"] if u != served and not u.startswith("data:")] == [], seen["requested"]
    blocked = [e for e in seen["logged"] if "Content Security Policy" in e.get("text", "")]
    assert blocked == [], blocked
    assert seen["fits"], "the page is wider than the window"
