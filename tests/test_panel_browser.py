"""The panel in a real browser: JupyterLab and `mlnb ui` (Voila) on 127.0.0.1, driven by Playwright
in Debian's headless Chromium (`make test` installs chromium when missing; never `playwright install`).
Screenshots land in tests/artifacts/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import MLNB, ROOT, free_port, run_cli, wait_for
from test_pipeline import notebook, project

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHOTS = ROOT / "tests" / "artifacts"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (make test installs it: apt-get install chromium)")

TRAIN = """
import mlnb, numpy as np, pandas as pd
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
X, y = load_breast_cancer(return_X_y=True, as_frame=True)
X_train, X_val, y_train, y_val = train_test_split(X, y, random_state=0)
scaler = StandardScaler().fit(X_train)
model = SGDClassifier(loss="log_loss", alpha=alpha, random_state=0)
for epoch in range(6):
    model.partial_fit(scaler.transform(X_train), y_train, classes=[0, 1])
    mlnb.log_metric("val_auc", roc_auc_score(y_val, model.predict_proba(scaler.transform(X_val))[:, 1]), step=epoch)
mlnb.log_model(make_pipeline(scaler, model), eval_data=X_val.head(60))
"""


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory) -> Path:
    "A project with two pipeline runs (their train steps differ in alpha), and a notebook that shows the panel."
    root = project(tmp_path_factory.mktemp("panel"), {"train": {"notebook": "train.ipynb"}}, name="reviewed")
    notebook(root / "train.ipynb", "alpha: float = 0.0001", TRAIN)
    for alpha in ("0.0001", "0.01"):
        result = run_cli("run", "-q", "-p", f"alpha={alpha}", cwd=root)
        assert result.returncode == 0, result.stderr
    cell = {"cell_type": "code", "execution_count": None, "id": "show", "metadata": {}, "outputs": [],
            "source": "import mlnb\nmlnb.panel()"}
    (root / "panel.ipynb").write_text(json.dumps({
        "cells": [cell], "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "mlnb", "display_name": "mlnb", "language": "python"}}}))
    SHOTS.mkdir(parents=True, exist_ok=True)
    return root


def _serve(cmd: list[str], port: int, cwd: Path, env: dict, path: str = "/") -> subprocess.Popen:
    "Starts a server whose output goes to a file (a pipe nobody reads would stop it once full): see `_log_tail`."
    log = cwd.parent / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    proc.log = log

    def up():
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2)
            return True
        except OSError as e:
            if proc.poll() is not None:
                raise AssertionError(_log_tail(proc)) from e
            return getattr(e, "code", None) in (302, 403)  # up, asking for the token
    wait_for(up, timeout=90, interval=0.3)
    return proc


def _log_tail(proc: subprocess.Popen) -> str:
    return f"the server's output ({proc.log}), last lines:\n" + proc.log.read_text(errors="replace")[-4000:]


def _check_served_panel(page, shot: str, server: subprocess.Popen) -> None:
    "`_check_panel`, failing with the server's last output (what its kernel said, if it hung)."
    try:
        _check_panel(page, shot)
    except Exception as e:
        raise AssertionError(f"{e}\n{_log_tail(server)}") from e


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _normal(text: str) -> str:
    return text.replace("\xa0", " ")


def _check_panel(page, shot: str) -> None:
    "What a person would check: the runs are listed; two selected show curves and the param that differs;"
    "a run and a row show the SHAP waterfall and LIME."
    page.wait_for_selector(".mlnb-runs-table table", timeout=120_000)
    table = page.locator(".mlnb-runs-table").inner_text()
    assert table.count("train") >= 2 and "pipeline" in table
    options = page.locator(".mlnb-run-select select option")
    labels = [options.nth(i).inner_text() for i in range(options.count())]
    trains = [label for label in labels if _normal(label).split(" ")[1] == "train"]
    assert len(trains) == 2, labels
    page.select_option(".mlnb-run-select select", label=trains)
    page.wait_for_function("document.querySelectorAll('.mlnb-curves .js-plotly-plot .scatterlayer .trace').length == 2",
                           timeout=60_000)
    # the params table arrives in a widget message after the curves': wait for it, then read it
    page.wait_for_function("(document.querySelector('.mlnb-param-diff') || {}).innerText?.includes('alpha')",
                           timeout=60_000)
    diff = page.locator(".mlnb-param-diff").inner_text()
    assert "alpha" in diff and "0.01" in diff and "0.0001" in diff
    page.screenshot(path=str(SHOTS / f"{shot}-compare.png"), full_page=True)
    page.get_by_text("Explain", exact=True).click()
    page.wait_for_selector(".mlnb-explain-note", state="visible")
    note = page.locator(".mlnb-explain-note").inner_text()
    if "explained with" not in note:  # the first test to get here computes it; the other reads it back
        assert "No explanation is stored" in note and "mlnb explain" in note
        page.get_by_role("button", name="Compute explanation").click()
    page.wait_for_selector(".mlnb-waterfall .js-plotly-plot", timeout=120_000)
    page.wait_for_selector(".mlnb-lime .js-plotly-plot", timeout=60_000)
    assert "linear explainer" in page.locator(".mlnb-explain-note").inner_text()
    rows = page.locator(".mlnb-row-picker select option")
    page.select_option(".mlnb-row-picker select", label=rows.nth(3).inner_text())
    page.wait_for_function("document.querySelector('.mlnb-waterfall').innerText.includes('row 3: SHAP waterfall')",
                           timeout=60_000)
    page.wait_for_function("document.querySelector('.mlnb-lime').innerText.includes('row 3: LIME')", timeout=60_000)
    page.screenshot(path=str(SHOTS / f"{shot}-explain.png"), full_page=True)


def _browser():
    from playwright.sync_api import sync_playwright
    manager = sync_playwright().start()
    browser = manager.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    return manager, browser


def test_the_panel_in_jupyterlab(reviewed, tmp_path):
    port, token = free_port(), "mlnb-test-token"
    env = {"JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    lab = _serve([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
                  f"--IdentityProvider.token={token}", *(["--allow-root"] if os.geteuid() == 0 else []),
                  "--LabApp.extension_manager=readonly", f"--ServerApp.root_dir={reviewed}",
                  "--LabApp.expose_app_in_browser=True",
                  "--LabApp.news_url=None", f"--LabServerApp.workspaces_dir={tmp_path / 'workspaces'}",
                  f"--LabServerApp.user_settings_dir={tmp_path / 'settings'}"], port, reviewed, env, "/lab")
    manager, browser = _browser()
    try:
        page = browser.new_page(viewport={"width": 1500, "height": 2200})
        page.goto(f"http://127.0.0.1:{port}/lab/tree/panel.ipynb?token={token}", timeout=120_000)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
        page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                               "window.jupyterapp.shell.currentWidget.sessionContext && "
                               "window.jupyterapp.shell.currentWidget.sessionContext.session && "
                               "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel", timeout=90_000)
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        _check_served_panel(page, "jupyterlab", lab)
    finally:
        browser.close()
        manager.stop()
        _stop(lab)


def test_the_panel_as_a_web_app(reviewed):
    port, token = free_port(), "mlnb-ui-token"
    ui = _serve([MLNB, "ui", "--port", str(port), "--token", token], port, reviewed, {})
    manager, browser = _browser()
    try:
        page = browser.new_page(viewport={"width": 1500, "height": 2200})
        # Voila streams the page while its kernel runs the notebook: "load" comes only when every cell has
        # run (over 30 s, Playwright's default, on a loaded machine). _check_panel waits for what matters.
        # (Each request for the page starts a kernel that runs the panel: one page, one kernel, here.)
        response = page.goto(f"http://127.0.0.1:{port}/?token={token}", wait_until="commit", timeout=120_000)
        assert response.status == 200, response.status
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        try:
            page.wait_for_selector(".mlnb-runs-table table", timeout=100_000)
        except PlaywrightTimeout:
            # The panel's hang (1 page in 7 here on a busy day): the kernel runs the cell, but its reply never reaches
            # Voila. mlnb.ui.server goes on 5 s after the kernel is idle (see the tests below); should a page still
            # hang, it is loaded once more, as a person would, and a panel that does not show then fails the test.
            print(f"the panel had not shown in 100 s (page {page.url}); loading it again", file=sys.stderr)
            page.reload(wait_until="commit", timeout=120_000)
        _check_served_panel(page, "voila", ui)
    finally:
        browser.close()
        manager.stop()
        _stop(ui)


def _one_cell_notebook_on_kernel(tmp_path: Path, argv: list[str], source: str) -> tuple[Path, dict]:
    "Writes a kernelspec `odd` running `argv`, and a notebook (one cell: `source`) on it; returns both for Voila."
    data = tmp_path / "jupyter"
    spec = data / "kernels" / "odd"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "odd", "language": "python"}))
    served = tmp_path / "served"
    served.mkdir()
    cell = {"cell_type": "code", "execution_count": None, "id": "c", "metadata": {}, "outputs": [], "source": source}
    (served / "odd.ipynb").write_text(json.dumps({
        "cells": [cell], "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "odd", "display_name": "odd", "language": "python"}}}))
    return served / "odd.ipynb", {"JUPYTER_PATH": str(data), "JUPYTER_DATA_DIR": str(data)}


def test_a_page_whose_kernel_never_answers_loads_again_once_then_shows_the_error(tmp_path):
    """`mlnb ui`'s Voila (mlnb.ui.server) when a page's kernel never answers: a kernelspec whose "kernel" only
    sleeps. Voila alone would show "Running ..." forever; the page loads again once, then shows the error, and
    the terminal says so."""
    from mlnb.cli.ui import voila_command
    notebook, env = _one_cell_notebook_on_kernel(
        tmp_path, [sys.executable, "-c", "import time; time.sleep(600)", "{connection_file}"], "1 + 1")
    port, token = free_port(), "mlnb-ui-token"
    server = _serve(voila_command(notebook, port, kernel_timeout=3), port, notebook.parent, {**env, "MLNB_UI_TOKEN": token})
    manager, browser = _browser()
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/?token={token}", wait_until="commit", timeout=60_000)
        error = page.wait_for_selector("pre.mlnb-ui-error", timeout=90_000)
        text = _normal(error.inner_text())
        assert "mlnb_retry=1" in page.url, page.url
        assert "could not be shown (RuntimeError: Kernel didn't respond in 3 seconds)" in text, text
        assert "Reload the page" in text, text
    finally:
        browser.close()
        manager.stop()
        _stop(server)
    log = server.log.read_text(errors="replace")
    assert log.count("mlnb ui: a page of the panel failed (RuntimeError") == 2, _log_tail(server)
    assert "it loads again." in log and "the page shows the error." in log, _log_tail(server)


# An ipykernel that runs cells but never sends their execute_reply (it still publishes their outputs and its
# "idle" status): what Voila's side of the panel's hang showed.
REPLYLESS = """
import sys
from ipykernel.kernelapp import IPKernelApp
app = IPKernelApp.instance()
app.initialize(sys.argv[1:])
send = app.session.send
def send_all_but_execute_replies(stream, msg_or_type, content=None, parent=None, *args, **kwargs):
    if msg_or_type == "execute_reply":
        return app.session.msg("execute_reply", content, parent=parent, metadata=kwargs.get("metadata"))
    return send(stream, msg_or_type, content, parent, *args, **kwargs)
app.session.send = send_all_but_execute_replies
app.start()
"""


def test_a_page_whose_cell_reply_never_comes_still_renders(tmp_path):
    """A kernel that runs the page's cell but never sends its reply: Voila alone waits for it forever ("Running
    ..."); mlnb.ui.server goes on once the kernel has said it is idle, and the page shows the cell's output."""
    from mlnb.cli.ui import voila_command
    notebook, env = _one_cell_notebook_on_kernel(
        tmp_path, [sys.executable, "-c", REPLYLESS, "-f", "{connection_file}"],
        "from IPython.display import HTML\nHTML('<b id=\"rendered\">rendered without its reply</b>')")
    port, token = free_port(), "mlnb-ui-token"
    server = _serve(voila_command(notebook, port), port, notebook.parent, {**env, "MLNB_UI_TOKEN": token})
    manager, browser = _browser()
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/?token={token}", wait_until="commit", timeout=60_000)
        shown = page.wait_for_selector("#rendered", timeout=60_000)
        assert shown.inner_text() == "rendered without its reply"
        assert "mlnb_retry" not in page.url, page.url
    finally:
        browser.close()
        manager.stop()
        _stop(server)
    assert "mlnb ui: the panel's kernel ran a cell but its reply never came" in server.log.read_text(errors="replace"), \
        _log_tail(server)
