"""The comparison as a user sees it, in headless Chromium: ``reports/index.html`` opened from disk
and the MLflow UI (``python -m pipelines.ui``, what ``make ui`` runs) on a small tracked store.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and selenium
(the dev extras). Without them the tests skip, unless ``CVFLOW_REQUIRE_BROWSER=1`` (set by CI),
where a missing browser is a failure. Screenshots go to the test's tmp folder and, when
``CVFLOW_SCREENSHOTS`` names a folder, there too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from components.tracking import mlflow_run as tracking
from components.training.driver import SeedOutcome, group_metrics
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# Seed values per entry: classifier and classifier_gc overlap; the random-init row is far below.
ENTRIES = {
    "classifier": ("classifier", 8, [0.81, 0.84, 0.86]),
    "classifier_gc": ("classifier", 8, [0.83, 0.85, 0.88]),
    "classifier_random_init": ("classifier", 0, [0.09, 0.11, 0.10]),
}


def _browser_or_skip():
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not found]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        reason = f"no {', '.join(missing)}: apt-get install chromium chromium-driver; pip install -e .[dev]"
        if os.environ.get("CVFLOW_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CVFLOW_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=2400,1300")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _screenshot(driver, tmp: Path, name: str) -> None:
    driver.save_screenshot(str(tmp / f"{name}.png"))
    if os.environ.get("CVFLOW_SCREENSHOTS"):
        folder = Path(os.environ["CVFLOW_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(folder / f"{name}.png"))


def _tracked_store(root: Path) -> tuple[str, dict[str, str]]:
    """A SQLite store as train@<run> leaves it: per entry a finished group run with its
    aggregates, three finished seed runs under it, the saved runs view. Returns the URI and the
    group run ids."""
    from mlflow import MlflowClient
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment(tracking.experiment_name("digits", "classification"))
    digits = Dataset(name="digits/crops/test", digest="0" * 32, source_type="code", source="{}")
    groups = {}
    for name, (method, epochs, values) in ENTRIES.items():
        group = client.create_run(exp, run_name=name).info.run_id
        common = {"method": method, "task": "classification", "dataset": "digits", "run": name}
        tags = {**common, tracking.RUN_KIND: "group", "seeds": "0,1,2", "paper": "arXiv:1512.03385"}
        client.log_batch(
            group,
            params=[Param("training.epochs", str(epochs))],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        client.log_inputs(group, [DatasetInput(digits, [InputTag("mlflow.data.context", "testing")])])
        outcomes = []
        for seed, top1 in enumerate(values):
            child = client.create_run(exp, run_name=f"{name}/seed{seed}").info.run_id
            child_tags = {**common, tracking.RUN_KIND: "seed", "seed": str(seed), "mlflow.parentRunId": group}
            now = int(time.time() * 1000)
            curve = [Metric("val/top1", top1 * (e + 1) / 3, now, e) for e in range(3)]
            final = {
                "test/top1": top1,
                "test/top5": min(1.0, top1 + 0.1),
                "compute/device_seconds": 40.0 + seed,
                "compute/parameters": 12345.0,
                "compute/train_wall_s": 20.0 + seed,
                "compute/eval_wall_s": 1.5,
            }
            client.log_batch(
                child,
                metrics=[*curve, *(Metric(k, v, now, 0) for k, v in final.items())],
                tags=[RunTag(k, v) for k, v in child_tags.items()],
            )
            client.set_terminated(child, "FINISHED")
            history = [{"val/top1": m.value} for m in curve]
            compute = {"device_seconds": final["compute/device_seconds"], "train_wall_s": final["compute/train_wall_s"]}
            test = {"test/top1": final["test/top1"], "test/top5": final["test/top5"]}
            outcomes.append(SeedOutcome(seed, child, False, False, test, top1, history, compute))
        now = int(time.time() * 1000)
        aggregates = group_metrics(outcomes, "top1")
        client.log_batch(group, metrics=[Metric(k, v, now, 0) for k, v in aggregates.items()])
        client.set_terminated(group, "FINISHED")
        groups[name] = group
    tracking.save_runs_view(client, exp, ["top1"])
    return uri, groups


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tracked store, params naming its entries, their results, and the report compare wrote."""
    root = tmp_path_factory.mktemp("compare")
    uri, groups = _tracked_store(root)
    params = {
        "mlflow": {"tracking_uri": uri},
        "runs": {name: {"method": method} for name, (method, _, _) in ENTRIES.items()},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for name, group in groups.items():
        (root / "results" / name).mkdir(parents=True)
        (root / "results" / name / "metrics.json").write_text(json.dumps({"mlflow_group_run_id": group}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.compare", "--params", "params.yaml", "--results", "results"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {"root": root, "uri": uri, "groups": groups, "env": env}


def _client(project):
    from mlflow import MlflowClient

    return MlflowClient(project["uri"])


def test_report_from_disk_shows_the_mlflow_figures(browser, project, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get((project["root"] / "reports" / "index.html").as_uri())
    client = _client(project)
    cells = browser.find_elements(By.CSS_SELECTOR, "td[data-run][data-metric='test/top1']")
    assert sorted(c.get_attribute("data-run") for c in cells) == sorted(ENTRIES)
    for cell in cells:
        group = client.get_run(project["groups"][cell.get_attribute("data-run")]).data.metrics
        for attr, key in (("data-mean", "_mean"), ("data-low", "_ci_low"), ("data-high", "_ci_high")):
            assert float(cell.get_attribute(attr)) == pytest.approx(group[f"test/top1{key}"], abs=1e-12)
        assert cell.text.startswith(f"{group['test/top1_mean']:.3f}"), cell.text
    compare = client.search_runs(
        [client.get_experiment_by_name("compare").experiment_id], filter_string="tags.run_kind = 'compare'"
    )[0]
    claims = browser.find_elements(By.CSS_SELECTOR, "p.claim[data-family]")
    assert claims, "no family sentence on the page"
    for p in claims:
        assert p.text == compare.data.tags[f"claim/{p.get_attribute('data-family')}"]
    assert "overlap" in claims[0].text  # classifier and classifier_gc's intervals overlap
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 3 and all(browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
    _screenshot(browser, tmp_path, "report")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_ui(project):
    """``python -m pipelines.ui`` on the store, as ``make ui`` starts it; yields its runs-view link."""
    port = _free_port()
    store = project["uri"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.ui", "--backend-store-uri", store, "--port", str(port)],
        cwd=project["root"],
        env={**project["env"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        first = [proc.stdout.readline() for _ in range(2)]
        link = re.search(r"(http://127\.0\.0\.1:\d+/#/experiments/\S+)", first[1])
        assert link, first
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow ui did not come up"
            time.sleep(0.5)
        yield link.group(1)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


GRID_JS = """
const out = [];
const parts = '.ag-center-cols-container .ag-row, .ag-pinned-left-cols-container .ag-row';
for (const row of document.querySelectorAll(parts)) {
  const cells = {};
  for (const c of row.querySelectorAll('[col-id]')) cells[c.getAttribute('col-id')] = c.innerText.trim();
  out.push({index: row.getAttribute('row-index'), cells: cells});
}
const headers = [...document.querySelectorAll('.ag-header-cell')].map(h => h.innerText.trim());
return {rows: out, headers: headers};
"""


def _grid(driver) -> dict[str, dict[str, str]]:
    """The runs table as shown: row index -> column id -> text, pinned and scrolled parts merged."""
    data = driver.execute_script(GRID_JS)
    rows: dict[str, dict[str, str]] = {}
    for r in data["rows"]:
        rows.setdefault(r["index"], {}).update(r["cells"])
    return rows, data["headers"]


def test_mlflow_ui_opens_on_group_runs_with_intervals(browser, project, mlflow_ui, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(mlflow_ui)
    names = set(ENTRIES)

    def shown(driver):
        rows, headers = _grid(driver)
        text = " ".join(" ".join(r.values()) for r in rows.values())
        return (rows, headers) if all(n in text for n in names) and any("top1_mean" in h for h in headers) else None

    try:
        rows, headers = WebDriverWait(browser, 90, poll_frequency=1).until(shown)
    except Exception:
        _screenshot(browser, tmp_path, "mlflow_runs_failed")
        raise
    time.sleep(1)  # let the last columns render
    rows, headers = _grid(browser)
    _screenshot(browser, tmp_path, "mlflow_runs")
    assert "/runs" in browser.current_url
    client = _client(project)
    by_name = {}
    for cells in rows.values():  # the name cell reads "<colour>\n<run name>"
        run_name = cells.get("attributes.`Run Name`", "").splitlines()[-1:]
        if run_name and run_name[0] in names:
            by_name[run_name[0]] = cells
    assert set(by_name) == names, rows
    for name, cells in by_name.items():
        assert cells["attributes.`Dataset`"].startswith("digits/crops/test"), cells  # the run's log_input
        metrics = client.get_run(project["groups"][name]).data.metrics
        for stat in ("mean", "ci_low", "ci_high"):
            key = f"test/top1_{stat}"
            col = next((c for c in cells if c.endswith(key) or c.endswith(f"`{key}`")), None)
            assert col is not None, f"no {key} column in {sorted(cells)}"
            assert float(cells[col]) == pytest.approx(metrics[key], abs=1e-3), (name, key, cells[col])
    # The saved view sorts by the primary mean, best first: the random-init row is last.
    order = sorted(by_name, key=lambda n: int(next(i for i, c in rows.items() if c is by_name[n])))
    assert order[-1] == "classifier_random_init", order
