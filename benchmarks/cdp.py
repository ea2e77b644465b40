"""Headless Chromium driven over the DevTools protocol, for screenshots of the MLflow UI after a
few clicks (a mode switch, an expanded parent run, a chart search), which a plain
``chromium --screenshot`` cannot do. Uses aiohttp (an MLflow dependency) for the websocket."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# Headless Chromium for a root user on a machine without a screen or network: no sandbox, no GPU,
# and none of the background connections (updates, sync) a closed network refuses.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class Page:
    """One browser tab: DevTools calls, JavaScript, clicks, typing and screenshots."""

    def __init__(self, ws: Any) -> None:
        self._ws, self._ids = ws, itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        await self._ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await self._ws.receive_json()
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str) -> Any:
        res = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")

    async def open(self, url: str, settle_s: float) -> None:
        await self.call("Page.navigate", url=url)
        await asyncio.sleep(settle_s)

    async def click(self, predicate: str, settle_s: float = 3, required: bool = True) -> bool:
        """Click the first button for which the JavaScript ``predicate`` (over ``b``) holds."""
        found = await self.js("(() => { const b = [...document.querySelectorAll('button,[role=button]')]"
                              f".find(b => {predicate}); if (b) b.click(); return !!b; }})()")
        if required and not found:
            raise RuntimeError(f"no button where {predicate}")
        await asyncio.sleep(settle_s)
        return bool(found)

    async def type_into(self, selector: str, text: str, settle_s: float = 3) -> None:
        if not await self.js(f"(() => {{ const i = document.querySelector({json.dumps(selector)}); "
                             "if (i) i.focus(); return !!i; })()"):
            raise RuntimeError(f"no input {selector}")
        await self.call("Input.insertText", text=text)
        await asyncio.sleep(settle_s)

    async def screenshot(self, out: str | Path) -> None:
        res = await self.call("Page.captureScreenshot", format="png")
        Path(out).write_bytes(base64.b64decode(res["data"]))


async def _session(size: tuple[int, int], script: Callable[[Page], Awaitable[None]], chromium: str) -> None:
    import aiohttp

    with tempfile.TemporaryDirectory(prefix="frcnn-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 f"--window-size={size[0]},{size[1]}", "--remote-debugging-port=0", "about:blank"],
                                stderr=subprocess.PIPE, text=True)
        try:
            host = next(m.group(1) for line in proc.stderr
                        if (m := re.search(r"DevTools listening on ws://([^/]+)/", line)))
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://{host}/json/list") as resp:
                    tab = next(t for t in await resp.json() if t["type"] == "page")
                async with http.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    page = Page(ws)
                    await page.call("Page.enable")
                    await page.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                                    deviceScaleFactor=1, mobile=False)
                    await script(page)
        finally:
            proc.kill()
            proc.wait()


def drive(size: tuple[int, int], script: Callable[[Page], Awaitable[None]], chromium: str = "chromium") -> None:
    """Run ``script`` on a fresh tab of a fresh headless Chromium of ``size`` pixels."""
    asyncio.run(_session(size, script, chromium))
