"""The wizards in a real browser: JupyterLab + Debian's chromium driven by Playwright.

Screenshots go to a temporary folder, so `make test` leaves the work tree clean; `make screenshots` sets
VRNX_SCREENSHOTS=docs/screenshots (relative to the repository root) to refresh the committed ones."""
import json, os, shutil, signal, socket, subprocess, sys, time, urllib.request, uuid
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
TUTORIAL = ROOT/"nbs"/"tutorials"/"wizards.ipynb"
SHOTS_ENV = "VRNX_SCREENSHOTS"  # where to write the screenshots; unset: pytest's tmp_path
JUPYTER = Path(sys.executable).parent/"jupyter"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")]

# Lab settings: render every cell (no windowing), no news / update pop-ups over the screenshots.
SETTINGS = {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
            "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
            "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autoStartDefaultKernel": True}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r: return r.status, r.read()


@pytest.fixture
def shots(tmp_path) -> Path:
    "The screenshot folder: $VRNX_SCREENSHOTS (relative paths from the repository root), else a temporary one."
    env = os.environ.get(SHOTS_ENV)
    d = (ROOT/env if not Path(env).is_absolute() else Path(env)) if env else tmp_path/"screenshots"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on a free loopback port with a token, rooted in a temp dir holding a copy of the tutorial."
    import psutil
    pytest.importorskip("playwright")
    work, conf = tmp_path/"root", tmp_path/"conf"
    work.mkdir()
    shutil.copy(TUTORIAL, work/"wizards.ipynb")
    for name, value in SETTINGS.items():
        p = conf/"settings"/name; p.parent.mkdir(parents=True, exist_ok=True); p.write_text(json.dumps(value))
    port, token = _free_port(), uuid.uuid4().hex
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(conf/"config"), "JUPYTER_RUNTIME_DIR": str(conf/"runtime"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    log = open(tmp_path/"lab.log", "w")
    proc = subprocess.Popen([str(JUPYTER), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
                             f"--LabApp.user_settings_dir={conf/'settings'}", f"--LabApp.workspaces_dir={conf/'workspaces'}",
                             "--ServerApp.open_browser=False"] + (["--allow-root"] if os.geteuid() == 0 else []),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None: pytest.fail(f"jupyter lab exited ({proc.returncode}):\n{(tmp_path/'lab.log').read_text()[-3000:]}")
            try:
                if _get(f"{base}/api/status?token={token}")[0] == 200: break
            except OSError: pass
            if time.time() > deadline: pytest.fail(f"jupyter lab did not answer in 90 s:\n{(tmp_path/'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"base": base, "token": token, "proc": proc, "root": work, "log": tmp_path/"lab.log"}
    finally:
        family = []
        try: family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess: pass
        try:  # clean shutdown: the server stops its kernels
            req = urllib.request.Request(f"{base}/api/shutdown", method="POST", headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(req, timeout=10).read()
            proc.wait(30)
        except Exception:
            try: os.killpg(proc.pid, signal.SIGTERM); proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try: os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError: pass
        gone, alive = psutil.wait_procs(family, timeout=15)
        for p in alive: p.kill()
        log.close()
        assert not alive, f"processes left behind by jupyter lab: {[p.pid for p in alive]}"


def _wait_text(page, selector, pred, timeout=120.0, what=""):
    "Wait until `pred(inner_text)` holds for the element; returns the text."
    deadline, text = time.time() + timeout, ""
    while time.time() < deadline:
        loc = page.locator(selector).first
        if loc.count():
            text = loc.inner_text()
            if pred(text): return text
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what or selector}; last text: {text[:500]!r}")


def _shot(page, selector, path:Path):
    page.wait_for_timeout(700)   # let the last widget updates of a finished run land
    loc = page.locator(selector).first
    loc.scroll_into_view_if_needed()
    loc.screenshot(path=str(path))
    assert path.stat().st_size > 5000


def _press_slider(page, selector, key, times) -> str:
    "Move a slider with the keyboard, as a user would; the value its readout shows afterwards."
    handle = page.locator(f"{selector} .noUi-handle").first
    handle.scroll_into_view_if_needed(); handle.focus()
    for _ in range(times):
        handle.press(key); page.wait_for_timeout(200)
    page.wait_for_timeout(500)
    return page.locator(f"{selector} .widget-readout").first.inner_text().strip()


@pytest.mark.timeout(420)
def test_wizards_in_jupyterlab(lab, shots):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = None
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1400})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{lab['base']}/lab/tree/wizards.ipynb?token={lab['token']}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            select = page.locator(".jp-Dialog button", has_text="Select")
            try: select.first.click(timeout=5_000)   # "Select Kernel", when the setting above is not honoured
            except Exception: pass
            page.wait_for_function("() => document.querySelector('.jp-Notebook-ExecutionIndicator[data-status=\"idle\"]') !== null "
                                   "&& !document.querySelector('.jp-Dialog')", timeout=120_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            page.wait_for_selector(".vrnx-results-box", timeout=180_000)
            page.wait_for_function("() => document.querySelectorAll('.jp-InputPrompt').length > 0 && "
                                   "![...document.querySelectorAll('.jp-InputPrompt')].some(p => p.textContent.includes('*'))", timeout=180_000)
            errs = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'] :text('Traceback')")
            assert errs.count() == 0, "a cell raised:\n" + "\n".join(errs.all_inner_texts())[:3000]

            # 1. strategy: two more steps of examples; the recommendation follows
            before = _wait_text(page, ".vrnx-strategy-summary", lambda t: "examples" in t, what="strategy summary")
            n = _press_slider(page, ".vrnx-strategy-examples", "ArrowRight", 2)
            assert int(n) > 40, n
            after = _wait_text(page, ".vrnx-strategy-summary", lambda t: t.startswith(f"{n} examples"), what="strategy to update")
            assert "reasons" in after.lower()
            _shot(page, ".vrnx-strategy-box", shots/"strategy_wizard.png")

            # 2. augment: fewer requests, run, wait for the table
            n = _press_slider(page, ".vrnx-augment-count", "ArrowLeft", 4)
            assert int(n) < 16, n
            page.locator(".vrnx-augment-run").first.click()
            status = _wait_text(page, ".vrnx-augment-status", lambda t: t.startswith(("done", "error")), what="augment run")
            assert status.startswith("done") and f"{n}/{n} requests" in status, status
            assert "kept" in page.locator(".vrnx-augment-table").first.inner_text()
            _shot(page, ".vrnx-augment-box", shots/"augment_wizard.png")

            # 3. train: rank one step up, train, wait for the saved folder
            rank = _press_slider(page, ".vrnx-train-rank", "ArrowRight", 1)
            page.locator(".vrnx-train-run").first.click()
            status = _wait_text(page, ".vrnx-train-status", lambda t: t.startswith(("done", "error", "stopped")), timeout=240, what="training")
            assert status.startswith("done") and "accuracy" in status, status
            page.wait_for_selector(".vrnx-train-run:not([disabled])", timeout=10_000)
            saved = page.locator(".vrnx-train-saved").first.inner_text()
            run_dir = Path(saved.split("saved to", 1)[1].strip())
            assert run_dir.parent == lab["root"]/"runs" and (run_dir/"result.json").exists(), run_dir
            assert json.loads((run_dir/"result.json").read_text())["config"]["r"] == int(rank)
            # 3b. export the finished run (merged, the default format): the status names the folder, which holds a model card
            page.wait_for_selector(".vrnx-train-export:not([disabled])", timeout=10_000)
            page.locator(".vrnx-train-export").first.click()
            exported = _wait_text(page, ".vrnx-train-export-status", lambda t: t.startswith(("merged,", "export failed")), timeout=120, what="export")
            assert exported.startswith("merged,") and " MB: " in exported, exported
            export_dir = Path(exported.split(" MB: ", 1)[1].strip())
            assert (export_dir/"README.md").exists() and (export_dir/"config.json").exists(), export_dir
            _shot(page, ".vrnx-train-box", shots/"train_wizard.png")

            # 4. results: the trained run arrived next to zero-shot; pick it alone, then both
            select = page.locator(".vrnx-results-pick select").first
            labels = []
            for _ in range(60):
                labels = [l.replace("\xa0", " ") for l in select.locator("option").evaluate_all("els => els.map(e => e.textContent)")]
                if len(labels) >= 2: break
                time.sleep(0.5)
            method = page.locator(".vrnx-train-method select").first.input_value()
            assert labels[0] == "zero-shot · legal" and labels[-1] == f"{method} · legal", labels
            _wait_text(page, ".vrnx-results-table", lambda t: "zero-shot" in t and method in t, what="both runs in the table")
            select.select_option(index=[len(labels) - 1])
            _wait_text(page, ".vrnx-results-table", lambda t: "zero-shot" not in t and method in t, what="the table to follow the pick")
            select.select_option(index=list(range(len(labels))))
            _wait_text(page, ".vrnx-results-table", lambda t: "zero-shot" in t and method in t, what="both runs again")
            _shot(page, ".vrnx-results-box", shots/"results_dashboard.png")
            assert not errors, errors
        except BaseException:
            shot = lab["log"].parent/"failure.png"
            try: page is not None and page.screenshot(path=str(shot), full_page=True)
            except Exception: pass
            print(f"page at failure: {shot}; server log: {lab['log']}")
            raise
        finally:
            browser.close()
