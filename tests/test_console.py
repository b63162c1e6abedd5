"""``fedlora console``: the token, the bind rules, the file rules, and a real
browser (Debian's Chromium, driven by Selenium) on a live tiny simulation."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TOKEN = "test-token-0123456789abcdef"
HERE = Path(__file__).parent
FEDLORA = (sys.executable, "-m", "fedlora")


def _run_dir(tmp_path: Path) -> Path:
    """A finished run's files, written by hand (no training needed here)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"num-server-rounds": 1, "strategy": "fedavg"}))
    (run / "status.json").write_text(json.dumps({"status": "completed", "reason": ""}))
    rounds = [
        {"round": 0, "global_accuracy": 0.25, "failures": []},
        {
            "round": 1,
            "global_accuracy": 0.5,
            "clients_ok": 1,
            "clients_sampled": 2,
            "clients_failed": 1,
            "extra": {"epsilon-max": 1.5, "global_perplexity": 9.0, "sample": "a secret"},
            "failures": ["partition-000001 (node 7): PrivacyBudgetExceeded: cap 1.0 reached"],
        },
    ]
    (run / "metrics.json").write_text(json.dumps({"rounds": rounds}))
    (run / "accuracy.png").write_bytes(b"\x89PNG fake")
    (run / "audit.json").write_text(
        json.dumps({"passed": True, "canaries": {"planted": 2, "rows": [{"secret": "4821-7730"}]}})
    )
    return run


@pytest.fixture
def client(tmp_path: Path) -> Any:
    from starlette.testclient import TestClient

    from fedlora.console.server import build_app

    return TestClient(build_app([_run_dir(tmp_path)], TOKEN), follow_redirects=False)


def test_every_request_needs_the_token(client: Any) -> None:
    for path in ("/", "/api/runs", "/api/runs/run", "/static/console.js", "/runs/run/files/x"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/runs", headers=bearer).status_code == 200
    # the token in the address is traded for an HttpOnly cookie, then dropped
    first = client.get(f"/?token={TOKEN}")
    assert first.status_code == 303 and first.headers["location"] == "/"
    cookie = first.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert client.get("/").status_code == 200  # the cookie now
    assert client.post("/api/runs", headers=bearer).status_code == 405  # read-only


def test_strict_headers_on_every_answer(client: Any) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for response in (client.get("/"), client.get("/", headers=bearer)):
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-content-type-options"] == "nosniff"


def test_no_file_outside_the_plots_is_served(client: Any, tmp_path: Path) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    ok = client.get("/runs/run/files/accuracy.png", headers=bearer)
    assert ok.status_code == 200 and ok.content == b"\x89PNG fake"
    secret = tmp_path / "secret.txt"
    secret.write_text("patient data")
    (tmp_path / "run" / "loss.png").symlink_to(secret)  # an allowed name, leading out
    for path in (
        "/runs/run/files/loss.png",
        "/runs/run/files/config.json",
        "/runs/run/files/..%2F..%2Fsecret.txt",
        "/runs/run/files/../../secret.txt",
        "/runs/..%2F/files/secret.txt",
        "/static/..%2F..%2Fserver.py",
        "/static/../server.py",
    ):
        response = client.get(path, headers=bearer)
        assert response.status_code == 404, (path, response.status_code)
        assert b"patient data" not in response.content and b"import" not in response.content


def test_the_page_shows_no_training_text_and_names_refusals(client: Any) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    view = client.get("/api/runs/run", headers=bearer).json()
    text = json.dumps(view)
    assert "a secret" not in text and "4821-7730" not in text  # samples, canary secrets
    assert view["rounds"][1]["generation"] == {"global_perplexity": 9.0}
    assert view["rounds"][1]["failures"] == [
        {
            "site": "partition-000001",
            "kind": "refused: budget",
            "reason": ("PrivacyBudgetExceeded: cap 1.0 reached"),
        }
    ]
    assert view["audit"]["canaries"] == {"planted": 2.0}


def test_beyond_loopback_only_with_tls(tmp_path: Path) -> None:
    from fedlora.console.server import build_app, serve

    with pytest.raises(
        ValueError,
        match=r"--host 0\.0\.0\.0: the console leaves this machine "
        r"only over TLS; give --certfile and --keyfile",
    ):
        serve([tmp_path], host="0.0.0.0", announce=lambda _s: None)
    with pytest.raises(ValueError, match="at least 16 characters"):
        build_app([tmp_path], "short")
    result = subprocess.run(
        [sys.executable, "-m", "fedlora", "console", str(tmp_path), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "only over TLS" in result.stderr


# ------------------------------------------------------------- the browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def console_url(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    import uvicorn

    from fedlora.console.server import build_app

    run_dir = tmp_path / "live-run"
    port = _free_port()
    config = uvicorn.Config(
        build_app([run_dir], TOKEN, poll_s=0.2), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", run_dir
    server.should_exit = True
    thread.join(10)


def _chromium() -> Any:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chrome and driver):
        pytest.skip(
            "no system Chromium: install Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver; .ci/run does) to run the browser test"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chrome
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument("--window-size=1400,2400")
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait(what: Any, timeout: float, message: str) -> Any:
    """Poll ``what`` until truthy. The page re-renders whenever the run's files
    change, so an element found a moment ago may be gone: that counts as "not
    yet", never as a failure."""
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = what()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(message)


#: The rounds table in one read: [round, cell texts...] per row. One script call
#: sees one rendering; reading row by row over WebDriver can straddle a re-render.
ROWS_JS = """return Array.from(document.querySelectorAll('#rounds tbody tr')).map(
    r => [r.getAttribute('data-round')].concat(Array.from(r.cells).map(c => c.innerText)));"""


@pytest.mark.slow
@pytest.mark.integration
def test_a_live_run_in_a_real_browser(
    console_url: tuple[str, Path], tiny_model_dir: Path, text_csv: Path
) -> None:
    from console_run import HOSTILE
    from selenium.webdriver.common.by import By

    url, run_dir = console_url
    browser = _chromium()
    sim_log = run_dir.parent / "simulation.log"
    sim = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "console_run.py"),
            *map(str, (tiny_model_dir, text_csv, run_dir)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=sim_log.open("w"),  # a pipe nobody reads would fill and block the run
        env={**os.environ, "PYTHONPATH": str(HERE)},
    )
    try:
        browser.get(url + "/")
        assert "401" in browser.find_element(By.TAG_NAME, "body").text  # no token: refused
        browser.get(f"{url}/?token={TOKEN}")
        assert browser.current_url == url + "/" or "#run/" in browser.current_url  # token dropped
        rows = lambda: browser.execute_script(ROWS_JS)  # noqa: E731
        _wait(
            lambda: any(r[0] == "1" for r in rows()),
            240,
            "round 1 never appeared on the page",
        )
        browser.execute_script("window.__noReload = 42;")  # gone if the page reloads
        assert sim.poll() is None, "the run ended before the live check could start"
        _wait(lambda: sim.poll() is not None, 240, "the simulation did not finish")
        assert sim.returncode == 0, sim_log.read_text()[-3000:]
        _wait(lambda: len(rows()) == 4, 30, "round 3 did not appear without a reload")
        assert browser.execute_script("return window.__noReload;") == 42
        _wait(
            lambda: "completed" in browser.find_element(By.CSS_SELECTOR, ".status").text,
            30,
            "the page never showed the run completed",
        )

        metrics = json.loads((run_dir / "metrics.json").read_text())["rounds"]
        shown = [[c.strip() for c in r[1:]] for r in rows()]
        assert [int(r[0]) for r in shown] == [m["round"] for m in metrics]
        assert [r[3] for r in shown] == [f"{m['global_accuracy']:.4f}" for m in metrics]
        replied = [f"{m['clients_ok']}/{m['clients_sampled']}" for m in metrics[1:]]
        assert [r[1] for r in shown[1:]] == replied
        points = browser.execute_script("return window.fedloraCharts.accuracy.data;")
        assert points[0] == [m["round"] for m in metrics]
        assert points[1] == pytest.approx([m["global_accuracy"] for m in metrics])

        # the failed site and its reason, shown as text (the hostile HTML stays inert)
        texts = lambda selector: browser.execute_script(  # noqa: E731
            "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText);",
            selector,
        )
        reasons = texts("#failures td.reason")
        assert len(reasons) == 3 and all(HOSTILE in r for r in reasons), reasons
        assert not browser.find_elements(By.ID, "pwned")
        site0 = texts('#sites tr[data-site="partition-000000"]')
        assert len(site0) == 1 and "round 1: error" in site0[0], site0

        shot = Path(os.environ.get("FEDLORA_SCREENSHOT_DIR", str(run_dir))) / "console.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        browser.quit()
        if sim.poll() is None:
            sim.kill()


@pytest.mark.integration
def test_beyond_loopback_over_tls_with_fedlora_certs(tmp_path: Path) -> None:
    """``--host 0.0.0.0`` with the certificates ``fedlora certs`` makes: HTTPS
    only, the token still required, the CA verifies the server."""
    import ssl
    import urllib.error
    import urllib.request

    certs = tmp_path / "certs"
    made = subprocess.run(
        [*FEDLORA, "certs", "--out", str(certs), "--host", "127.0.0.1", "--node", "site-a"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    port = _free_port()
    proc = subprocess.Popen(
        [
            *FEDLORA,
            "console",
            str(_run_dir(tmp_path)),
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--certfile",
            str(certs / "server.pem"),
            "--keyfile",
            str(certs / "server.key"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "FEDLORA_CONSOLE_TOKEN": TOKEN},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == f"fedlora console: https://0.0.0.0:{port}/?token={TOKEN}", line
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        url = f"https://127.0.0.1:{port}/api/runs"
        for _ in range(100):
            try:
                urllib.request.urlopen(url, context=context, timeout=5)
            except urllib.error.HTTPError as exc:
                assert exc.code == 401  # up, and refusing without the token
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("the console never answered over TLS")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, context=context, timeout=5) as answer:
            assert json.loads(answer.read())["runs"][0]["name"] == "run"
        import http.client

        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
        conn.request("GET", f"/?token={TOKEN}")
        cookie = conn.getresponse().getheader("set-cookie") or ""
        assert "secure" in cookie.lower() and "httponly" in cookie.lower()  # never sent plain
        conn.close()
        with pytest.raises(OSError):  # no plain HTTP on that port
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=5)
    finally:
        proc.terminate()
        proc.wait(10)


def test_sweeps_folders_and_live_runs_are_found_and_compared(tmp_path: Path) -> None:
    from fedlora.console.views import discover, overview, run_view

    sweep = tmp_path / "sweep"
    for cell, acc in (("strategy=fedavg", 0.5), ("strategy=ffa-lora", 0.75)):
        (sweep / cell).mkdir(parents=True)
        rounds = [{"round": 0, "global_accuracy": 0.25}, {"round": 1, "global_accuracy": acc}]
        (sweep / cell / "metrics.json").write_text(json.dumps({"rounds": rounds}))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "status.json").write_text(json.dumps({"status": "completed"}))
    # a hostile sweep.json naming folders outside the sweep: not shown
    cells = ["strategy=fedavg", "strategy=ffa-lora", "../elsewhere", "/etc"]
    (sweep / "sweep.json").write_text(json.dumps({"cells": cells}))
    live = tmp_path / "not-started-yet"
    runs = discover([sweep, live])
    assert runs == {
        "sweep_strategy=fedavg": sweep / "strategy=fedavg",
        "sweep_strategy=ffa-lora": sweep / "strategy=ffa-lora",
        "not-started-yet": live,
    }
    table = {r["name"]: r for r in overview(runs)}
    assert table["sweep_strategy=ffa-lora"]["global_accuracy"] == 0.75
    assert table["sweep_strategy=fedavg"]["accuracy_by_round"] == [[0, 0.25], [1, 0.5]]
    assert table["not-started-yet"]["status"] == "waiting"
    assert run_view("not-started-yet", live)["rounds"] == []


def test_placement_is_summarised_per_ray_node(tmp_path: Path) -> None:
    from fedlora.console.views import placement_view

    lines = [
        {"partition": 0, "ray_node": "a" * 40, "ip": "10.0.0.1"},
        {"partition": 2, "ray_node": "a" * 40, "ip": "10.0.0.1"},
        {"partition": 1, "ray_node": "b" * 40, "ip": "10.0.0.2"},
    ]
    text = "\n".join(json.dumps(v) for v in lines) + '\n{"torn'
    (tmp_path / "placement.jsonl").write_text(text)
    assert placement_view(tmp_path) == [
        {"node": "a" * 12, "ip": "10.0.0.1", "messages": 2, "partitions": [0, 2]},
        {"node": "b" * 12, "ip": "10.0.0.2", "messages": 1, "partitions": [1]},
    ]


def test_a_sites_cap_is_what_its_node_enforces_and_the_plan_is_only_planned() -> None:
    from fedlora.console.views import sites_view

    clients = [
        {"site": "partition-000000", "round": 1, "epsilon": 4.44},
        {"site": "partition-000000", "round": 2, "epsilon": 7.99},
    ]
    plan = {"sites": [{"epsilon": 7.98}]}  # the plan's estimate, a hair below the spend
    (simulated,) = sites_view(clients, [], plan, cap=8.0)
    assert (simulated["epsilon"], simulated["epsilon_cap"]) == (7.99, 8.0)
    assert simulated["epsilon_planned"] == 7.98
    assert simulated["epsilon_by_round"] == {"1": 4.44, "2": 7.99}
    (uncapped,) = sites_view(clients, [], plan)  # sim-epsilon-cap=0, or a deployment
    assert uncapped["epsilon_cap"] is None and uncapped["epsilon_planned"] == 7.98


def test_the_run_view_takes_the_cap_from_the_config(tmp_path: Path) -> None:
    from fedlora.console.views import run_view

    run = _run_dir(tmp_path)
    (run / "config.json").write_text(json.dumps({"num-server-rounds": 1, "sim-epsilon-cap": 3}))
    (run / "clients.json").write_text(json.dumps([{"site": "a", "round": 1, "epsilon": 1.5}]))
    sites = {s["site"]: s for s in run_view("run", run)["sites"]}
    site = sites["a"]
    assert site["epsilon_cap"] == 3.0 and site["epsilon_planned"] is None
