"""The web app in a real headless browser (Debian chromium + chromedriver, driven by Selenium).

Loads the page, starts a demo task training (a tiny random BERT as the default model, 2+2 steps), waits until
the progress shows it done, predicts a sentence in the Predict tab and waits for the probability chart. A
screenshot of each stage goes to test-artifacts/ (gitignored). Nothing is downloaded: the driver path is
given explicitly and Selenium Manager runs offline.
"""
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tiny import make_tiny_model_dir, make_vector

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _need_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.exists(p) and os.access(p, os.X_OK))]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = f"browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def driver(tmp_path, monkeypatch):
    _need_browser()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not download a driver or a browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="dx-chrome-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1400,1300", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def app(tmp_path, monkeypatch, launch_app):
    monkeypatch.setenv("DEFTX_DEFAULT_MODEL", str(make_tiny_model_dir(tmp_path / "tiny")))
    monkeypatch.setenv("DEFTX_WARMUP", "0")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from webapp.settings import launch_kwargs

    home = tmp_path / "home"
    demo, studio = launch_app(home, **launch_kwargs(home))
    yield demo
    studio.registry.shutdown(cancel_running=True)
    demo.close()


def wait(d, cond, timeout=30, what="condition"):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            value = cond(d)
            if value:
                return value
        except Exception as e:  # noqa: BLE001 -- elements come and go while Gradio renders
            last = e
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} ({last})")


def tab(d, label):
    from selenium.webdriver.common.by import By

    btn = wait(d, lambda d: next((b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                                  if b.text.strip() == label), None), what=f"tab {label}")
    btn.click()


def text_of(d, css):
    from selenium.webdriver.common.by import By

    return d.find_element(By.CSS_SELECTOR, css).get_attribute("textContent")


def set_number(d, elem_id, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = d.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def start_task_sft(d, full: int, sparse: int) -> None:
    """In the Train tab: a task SFT on the preset's example data with ``full`` + ``sparse`` steps, started."""
    from selenium.webdriver.common.by import By

    tab(d, "Train")
    d.find_element(By.XPATH, "//*[@id='dx-kind']//label[contains(., 'Task SFT')]").click()
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#dx-data textarea").get_attribute("value")
         .endswith("source_task_en.csv"), what="the preset to switch to task data")
    d.find_element(By.XPATH, "//button[contains(., 'Training length and optimiser')]").click()
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#dx-full-steps input[type=number]").is_displayed(),
         what="the training-length accordion")
    set_number(d, "dx-full-steps", full)
    set_number(d, "dx-sparse-steps", sparse)
    time.sleep(0.5)
    d.find_element(By.ID, "dx-start").click()


def test_demo_training_then_prediction(driver, app):
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    d = driver
    d.get(app.local_url)
    wait(d, lambda d: "DeFT-X Studio" in d.title, what="page title")
    tab(d, "Data")  # the page opens on Start (the guided demo); this test goes through the tabs
    wait(d, lambda d: "400 lines" in d.page_source, what="the example corpus preview")  # checked on load

    start_task_sft(d, full=2, sparse=2)
    wait(d, lambda d: "started" in text_of(d, "#dx-train-status") or "queued" in text_of(d, "#dx-train-status"),
         what="the run to start")
    wait(d, lambda d: "running" in text_of(d, "#dx-progress") or "done" in text_of(d, "#dx-progress"),
         timeout=60, what="progress")
    d.save_screenshot(str(ARTIFACTS / "webapp_browser_training.png"))
    wait(d, lambda d: "done" in text_of(d, "#dx-progress"), timeout=240, what="the run to finish (done)")
    assert "step 4 / 4" in text_of(d, "#dx-progress")
    d.save_screenshot(str(ARTIFACTS / "webapp_browser_trained.png"))

    tab(d, "Predict")
    wait(d, lambda d: "task" in d.find_element(By.CSS_SELECTOR, "#dx-task-vector input").get_attribute("value"),
         what="the new task vector to be preselected")
    d.find_element(By.CSS_SELECTOR, "#dx-text textarea").send_keys("Makanannya enak sekali!")
    d.find_element(By.ID, "dx-predict").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#dx-probs .js-plotly-plot"), timeout=90,
         what="the probability chart")
    status = wait(d, lambda d: text_of(d, "#dx-predict-status"), what="the predicted label")
    assert "%" in status and any(label in status for label in ("negative", "neutral", "positive"))
    time.sleep(1)
    d.save_screenshot(str(ARTIFACTS / "webapp_browser.png"))


def shown_step(d) -> int:
    """The step the Train tab's progress card shows ("step N / M"), 0 before one shows."""
    import re

    m = re.search(r"step (\d+) / \d+", text_of(d, "#dx-progress"))
    return int(m.group(1)) if m else 0


def test_cancel_then_resume_in_the_browser(driver, app):
    """Cancel a task SFT in its sparse phase from the Train tab, then press Resume: the cancel is no error (no
    red mark) and names the app's Resume; the same run goes on from its mask (phase 1 is not run again) past the
    step it stopped at. The run is long (5,000 sparse steps) so that it is still running whatever the machine's
    speed when Cancel is pressed; it is cancelled again at the end."""
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    d = driver
    d.get(app.local_url)
    wait(d, lambda d: "DeFT-X Studio" in d.title, what="page title")
    start_task_sft(d, full=4, sparse=5000)
    wait(d, lambda d: shown_step(d) > 6 and "running" in text_of(d, "#dx-progress"), timeout=180,
         what="the run to be in its sparse phase")
    d.find_element(By.ID, "dx-cancel").click()
    said = wait(d, lambda d: "cancelled" in (t := text_of(d, "#dx-train-status")) and t, timeout=60,
                what="the run to be cancelled")
    assert "✖" not in said and "Resume" in said and "--resume" not in said, said
    stopped_at = shown_step(d)
    assert 4 < stopped_at < 5004, text_of(d, "#dx-progress")
    d.save_screenshot(str(ARTIFACTS / "webapp_browser_cancelled.png"))
    d.find_element(By.ID, "dx-resume").click()
    wait(d, lambda d: "continues from its last checkpoint" in text_of(d, "#dx-train-status"), timeout=60,
         what="the run to be resumed")
    wait(d, lambda d: "running" in text_of(d, "#dx-progress") and shown_step(d) > stopped_at + 2, timeout=180,
         what="the resumed run to go on past the step it stopped at")
    log = d.find_element(By.CSS_SELECTOR, ".dx-log textarea").get_attribute("value")
    assert "resumed: mask found, phase 1 skipped" in log, log[-2000:]
    d.save_screenshot(str(ARTIFACTS / "webapp_browser_resumed.png"))
    d.find_element(By.ID, "dx-cancel").click()
    wait(d, lambda d: "cancelled" in text_of(d, "#dx-train-status"), timeout=60, what="the run to be cancelled again")


def test_guided_demo_run(driver, app):
    """Run the demo from the Start tab: both runs' steps show as they progress, then Predict opens with the
    two vectors chosen and the example file scored beside the task vector alone."""
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    d = driver
    d.get(app.local_url)
    wait(d, lambda d: d.find_element(By.ID, "dx-demo").is_displayed(), what="the Run the demo button")
    d.find_element(By.ID, "dx-demo").click()
    wait(d, lambda d: "queued" in text_of(d, "#dx-demo-status"), what="the demo to be queued")
    wait(d, lambda d: "●" in text_of(d, "#dx-demo-steps"), timeout=90, what="a step in progress")
    steps = text_of(d, "#dx-demo-steps")
    assert "Language SFT" in steps and "Task SFT" in steps and "phase 2" in steps
    d.save_screenshot(str(ARTIFACTS / "webapp_guided_running.png"))
    status = wait(d, lambda d: "task only" in text_of(d, "#dx-predict-file-status") and
                  text_of(d, "#dx-predict-file-status"), timeout=420, what="the example file scored in Predict")
    assert "with the language vector: macro-F1" in status and "difference" in status
    assert d.find_element(By.ID, "dx-predict-file-status").is_displayed()  # Predict is the open tab
    assert "demo-en-task" in d.find_element(By.CSS_SELECTOR, "#dx-task-vector input").get_attribute("value")
    in_view = ("const r = arguments[0].getBoundingClientRect();"
               " return r.top >= 0 && r.bottom <= window.innerHeight;")
    wait(d, lambda d: d.execute_script(in_view, d.find_element(By.ID, "dx-predict-file-status")), timeout=10,
         what="the demo's scores scrolled into view by the app")  # not below the fold
    time.sleep(1)
    d.save_screenshot(str(ARTIFACTS / "webapp_guided_scored.png"))
    tab(d, "Start")
    wait(d, lambda d: "held-out masked-token loss" in text_of(d, "#dx-demo-steps"), what="the held-out evidence")
    d.save_screenshot(str(ARTIFACTS / "webapp_guided_steps.png"))
    d.refresh()  # a reload shows the finished demo with its score (once: an empty Start tab)
    wait(d, lambda d: "task only" in text_of(d, "#dx-demo-steps"), timeout=60, what="the finished demo after a reload")
    assert "The demo is done" in text_of(d, "#dx-demo-status") and "held-out" in text_of(d, "#dx-demo-steps")


@pytest.fixture
def app_with_vectors(tmp_path, monkeypatch, launch_app):
    """An app whose registry holds a task and a language vector of a tiny model (pulled, so no training)."""
    from deftx_engine.models.loading import load_cls_model
    from webapp.rundb import RunDB

    base = str(make_tiny_model_dir(tmp_path / "tiny"))
    monkeypatch.setenv("DEFTX_DEFAULT_MODEL", base)
    monkeypatch.setenv("DEFTX_WARMUP", "0")
    home = tmp_path / "home"
    reg = RunDB(home)
    model = load_cls_model(base, ["negative", "neutral", "positive"])
    for name, kind in (("tiny-id-language", "language"), ("tiny-en-task", "task")):
        vec = make_vector(model, kind=kind, base_model=base, seed=len(name))
        vec.meta.label_names = ["negative", "neutral", "positive"] if kind == "task" else []
        run_id = reg.new_id()
        vec.save(reg.vectors_root / run_id)
        reg.add_vector(name, kind, reg.vectors_root / run_id, run_id=run_id,
                       config={"base_model": base, "language": name.split("-")[1]})
    demo, studio = launch_app(home)
    yield demo
    studio.registry.shutdown(cancel_running=True)
    demo.close()


def visible_width(d) -> float:
    return d.execute_script("const p = [...document.querySelectorAll('[role=tabpanel]')].find(e => e.offsetWidth);"
                            "return p ? p.getBoundingClientRect().width : 0;")


def overlaps(d, plot_css) -> bool:
    """Whether a figure's title and its (hover) toolbar share pixels."""
    return d.execute_script(
        "const p = document.querySelector(arguments[0]); const t = p.querySelector('.gtitle');"
        "const m = p.querySelector('.modebar'); if (!t || !m) return null;"
        "const a = t.getBoundingClientRect(), b = m.getBoundingClientRect();"
        "return !(a.right < b.left || b.right < a.left || a.bottom < b.top || b.bottom < a.top);", plot_css)


def test_tabs_titles_labels_and_deleting_a_run(driver, app_with_vectors):
    """Issue 12's rough edges as a newcomer sees them: every tab as wide as the others (the header and tab bar never
    jump), figure titles clear of Plotly's toolbar, short picker labels, the Runs table's vector and message on
    screen, and deleting a run with a confirmation; screenshots of the Predict, Analyze and Runs tabs."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    d = driver
    d.get(app_with_vectors.local_url)
    wait(d, lambda d: "DeFT-X Studio" in d.title, what="page title")
    from webapp.ui import TABS

    widths = {}
    for label, _ in TABS:
        tab(d, label)
        time.sleep(0.6)
        widths[label] = visible_width(d)
    assert max(widths.values()) - min(widths.values()) < 2, widths  # no sideways jump between tabs

    tab(d, "Predict")
    picked = wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#dx-task-vector input").get_attribute("value"),
                  what="the task vector preselected")
    assert picked == "tiny-en-task · task (en)"  # short: nothing cut under the arrow, no run id
    d.find_element(By.CSS_SELECTOR, "#dx-text textarea").send_keys("Makanannya enak sekali!")
    d.find_element(By.ID, "dx-predict").click()
    plot = wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#dx-probs .js-plotly-plot"), timeout=90,
                what="the probability chart")
    ActionChains(d).move_to_element(plot).perform()  # the toolbar shows on hover
    time.sleep(0.5)
    assert overlaps(d, "#dx-probs") is False
    assert not d.find_elements(By.CSS_SELECTOR, "#dx-probs text.bartext[transform*='rotate']")
    d.save_screenshot(str(ARTIFACTS / "webapp_predict.png"))

    tab(d, "Analyze")
    wait(d, lambda d: "entries" in d.find_element(By.ID, "dx-analyze-summary").text, timeout=60,
         what="the vector summary")
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#dx-analyze-density .js-plotly-plot .gtitle"),
         what="the density figure")
    time.sleep(1)
    assert "SVD spectra: none" in d.find_element(By.ID, "dx-analyze-summary").text  # pulled: said, no empty box
    d.save_screenshot(str(ARTIFACTS / "webapp_analyze.png"))

    tab(d, "Runs")
    table = wait(d, lambda d: d.find_element(By.ID, "dx-runs"), what="the runs table")
    right = table.rect["x"] + table.rect["width"]
    for column in ("vector", "message"):  # on screen without scrolling sideways
        head = d.find_element(By.XPATH, f"//*[@id='dx-runs']//th[contains(., '{column}')]")
        assert head.rect["x"] + head.rect["width"] <= right + 1, column
    d.save_screenshot(str(ARTIFACTS / "webapp_runs.png"))
    pick = d.find_element(By.CSS_SELECTOR, "#dx-delete-pick input")
    pick.click()
    option = wait(d, lambda d: next((o for o in d.find_elements(By.CSS_SELECTOR, "ul[role=listbox] li")
                                     if "tiny-id-language" in o.text), None), what="the run in the picker")
    option.click()
    d.find_element(By.ID, "dx-delete").click()
    wait(d, lambda d: "cannot be undone" in text_of(d, "#dx-delete-question"), what="the confirmation")
    d.find_element(By.ID, "dx-delete-yes").click()
    wait(d, lambda d: "deleted" in text_of(d, "#dx-runs-status"), what="the deletion")
    assert "tiny-id-language" not in text_of(d, "#dx-runs")


@pytest.fixture
def hub_app(released_hub, tmp_path, monkeypatch, launch_app):
    """An app on the local Hub (``released_hub``): nothing on the server yet."""
    monkeypatch.setenv("DEFTX_WARMUP", "0")
    demo, studio = launch_app(tmp_path / "home")
    yield demo
    studio.registry.shutdown(cancel_running=True)
    demo.close()


def test_gallery_pick_to_prediction_then_push(driver, hub_app, released_hub):
    """Issue 22 in a real browser: the Hub tab says the Hub answered and lists the released vectors; "jav" picks
    the Javanese language vector beside the sentiment task vector; Use in Predict pulls both, fetches the base
    model from the Hub and opens Predict with them, which predicts; pushing a vector lists it in the gallery."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from tiny import RELEASED

    ARTIFACTS.mkdir(exist_ok=True)
    d = driver
    d.get(hub_app.local_url)
    wait(d, lambda d: "DeFT-X Studio" in d.title, what="page title")
    tab(d, "Hub")
    wait(d, lambda d: "Hub answered" in text_of(d, "#dx-hub-status"), what="the Hub's answer")
    d.find_element(By.CSS_SELECTOR, "#dx-gallery-language textarea").send_keys("jav", Keys.ENTER)
    wait(d, lambda d: RELEASED["language"] in d.find_element(By.CSS_SELECTOR, "#dx-gallery-lang input")
         .get_attribute("value"), what="the Javanese vector picked")
    assert RELEASED["task"] in d.find_element(By.CSS_SELECTOR, "#dx-gallery-task input").get_attribute("value")
    time.sleep(0.5)
    d.save_screenshot(str(ARTIFACTS / "webapp_gallery.png"))

    start = time.perf_counter()
    d.find_element(By.ID, "dx-gallery-use").click()
    wait(d, lambda d: d.find_element(By.ID, "dx-predict").is_displayed(), timeout=90, what="Predict to open")
    picked = wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#dx-task-vector input").get_attribute("value"),
                  what="the task vector chosen")
    assert RELEASED["task"] in picked
    d.find_element(By.CSS_SELECTOR, "#dx-text textarea").send_keys("Makanannya enak sekali!")
    d.find_element(By.ID, "dx-predict").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#dx-probs .js-plotly-plot"), timeout=90,
         what="the probability chart")
    status = wait(d, lambda d: "%" in text_of(d, "#dx-predict-status") and text_of(d, "#dx-predict-status"),
                  what="the predicted label")
    print(f"browser: pick to first prediction {time.perf_counter() - start:.2f} s")
    assert any(label in status for label in ("negative", "neutral", "positive"))
    d.save_screenshot(str(ARTIFACTS / "webapp_gallery_predict.png"))

    tab(d, "Hub")
    d.find_element(By.CSS_SELECTOR, "#dx-push-repo textarea").send_keys("me/deftx-browser")
    d.find_element(By.ID, "dx-push").click()  # HF_TOKEN: the local Hub's
    wait(d, lambda d: "me/deftx-browser" in text_of(d, "#dx-gallery"), timeout=60, what="the pushed vector listed")
    assert "pushed with DeFT-X" in text_of(d, "#dx-gallery") and "1 pushed" in text_of(d, "#dx-hub-status")
