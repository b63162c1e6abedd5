"""The console's page in headless Chromium: load time and bytes.

Serves ``fedlora console`` over a run directory (a finished run's, given, or a
tiny 3-round simulation run here) and opens it cold five times: the time to
the first rendered round row (data fetched over the event stream and drawn),
the navigation's DOM-ready time, and the bytes of every response. Prints JSON.
With ``--screenshot PNG``, then saves the whole page as the browser drew it
(the README's ``docs/console.png`` is made this way).

    .venv/bin/python bench/console_load.py [--run-dir runs/latest] [--screenshot out.png]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

TOKEN = "bench-token-0123456789abcdef"


def tiny_run(root: Path) -> Path:
    from fedlora.simulations.engine import Resources, simulate
    from fedlora.simulations.tiny import make_text_csv, make_tiny_model, tiny_run_config

    model = make_tiny_model(root / "model")
    data = make_text_csv(root / "data" / "news.csv")
    run = root / "run"
    flat = tiny_run_config(model, data, run, **{"num-server-rounds": 3})
    simulate(flat, 3, Resources(num_cpus=1))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--screenshot", type=Path, default=None, help="save the page as PNG")
    parser.add_argument("--fragment", default="", help="a view to shoot, e.g. run/<name>")
    args = parser.parse_args()
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from fedlora.console.server import build_app

    run = args.run_dir or tiny_run(Path(tempfile.mkdtemp(prefix="fedlora-console-")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(build_app([run], TOKEN), host="127.0.0.1", port=port, log_level="error")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    first_row, dom_ready, sizes = [], [], []
    for _ in range(args.loads):
        browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            browser.get(f"http://127.0.0.1:{port}/?token={TOKEN}")  # cookie, then the page
            start = time.monotonic()
            browser.get(f"http://127.0.0.1:{port}/")
            while not browser.find_elements(By.CSS_SELECTOR, "#rounds tbody tr"):
                time.sleep(0.005)
            first_row.append(time.monotonic() - start)
            nav = browser.execute_script(
                "return performance.getEntriesByType('navigation')[0].toJSON();"
            )
            dom_ready.append(nav["domContentLoadedEventEnd"] / 1000)
            resources = browser.execute_script(
                "return performance.getEntriesByType('resource')"
                ".map(r => [r.name, r.encodedBodySize, r.decodedBodySize]);"
            )
            sizes.append(
                {
                    "html": nav["decodedBodySize"],
                    "resources": {
                        name.split(str(port))[-1]: decoded for name, _, decoded in resources
                    },
                }
            )
        finally:
            browser.quit()
    if args.screenshot:
        options.add_argument("--window-size=1400,900")
        browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            browser.get(f"http://127.0.0.1:{port}/?token={TOKEN}")
            browser.get(f"http://127.0.0.1:{port}/#{args.fragment}")
            while not browser.find_elements(By.CSS_SELECTOR, "#rounds tbody tr"):
                time.sleep(0.05)
            time.sleep(1.0)  # charts and images settle
            height = browser.execute_script("return document.documentElement.scrollHeight;")
            browser.set_window_size(1400, min(int(height) + 40, 6000))
            time.sleep(0.5)
            browser.save_screenshot(str(args.screenshot))
        finally:
            browser.quit()
    server.should_exit = True
    page_bytes = sizes[-1]["html"] + sum(
        v for k, v in sizes[-1]["resources"].items() if not k.startswith("/api/")
    )
    print(
        json.dumps(
            {
                "run_dir": str(run),
                "loads": args.loads,
                "first_round_row_s_median": round(statistics.median(first_row), 3),
                "first_round_row_s": [round(v, 3) for v in first_row],
                "dom_content_loaded_s_median": round(statistics.median(dom_ready), 3),
                "page_bytes_uncompressed": page_bytes,
                "responses": sizes[-1],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
