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

from tiny import make_tiny_model_dir

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


def test_demo_training_then_prediction(driver, app):
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    d = driver
    d.get(app.local_url)
    wait(d, lambda d: "DeFT-X Studio" in d.title, what="page title")
    wait(d, lambda d: "400 lines" in d.page_source, what="the example corpus preview")  # Data tab on load

    tab(d, "Train")
    d.find_element(By.XPATH, "//*[@id='dx-kind']//label[contains(., 'Task SFT')]").click()
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#dx-data textarea").get_attribute("value")
         .endswith("source_task_en.csv"), what="the preset to switch to task data")
    d.find_element(By.XPATH, "//button[contains(., 'Training length and optimiser')]").click()
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#dx-full-steps input[type=number]").is_displayed(),
         what="the training-length accordion")
    set_number(d, "dx-full-steps", 2)
    set_number(d, "dx-sparse-steps", 2)
    time.sleep(0.5)
    d.find_element(By.ID, "dx-start").click()
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
