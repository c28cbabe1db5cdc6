"""The report in a real browser: headless Chromium (Debian's chromium + chromium-driver)."""

from __future__ import annotations

import shutil

import pytest

from conftest import run_cli

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (make test installs them when run as root)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1300,1000"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _images_loaded(driver) -> list:
    return driver.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]);")


def test_report_in_headless_chromium(browser, script_study, tmp_path):
    from selenium.webdriver.common.by import By

    _, report = script_study
    browser.get((report / "index.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")
    assert len(rows) == 2
    images = _images_loaded(browser)
    assert images and all(ok for _, ok in images), images

    def first_column():
        return [r.find_elements(By.TAG_NAME, "td")[0].text for r in
                browser.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")]

    header = browser.find_elements(By.CSS_SELECTOR, "#leaderboard th")[0]
    header.click()
    ascending = first_column()
    header.click()
    descending = first_column()
    assert ascending == ["trial 0", "trial 1"] and descending == ["trial 1", "trial 0"]
    assert header.get_attribute("aria-sort") == "descending"
    browser.save_screenshot(str(tmp_path / "index.png"))
    assert (tmp_path / "index.png").stat().st_size > 10_000

    browser.find_element(By.LINK_TEXT, "trial 0").click()
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Trial 0")
    images = _images_loaded(browser)
    assert len(images) >= 3 and all(ok for _, ok in images), images
    alerts = browser.execute_script("return document.querySelectorAll('script').length")
    assert alerts == 1  # the caption's <script> is text, not a script
    browser.save_screenshot(str(tmp_path / "trial.png"))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_front_page_pictures_in_chromium_and_a_running_study_reads(browser, script_study, tmp_path):
    import json
    import shutil

    from selenium.webdriver.common.by import By

    from lora_lab.report.study import build_report

    _, report = script_study
    browser.get((report / "index.html").as_uri())
    winner = browser.find_elements(By.CSS_SELECTOR, "#winner img.thumb")
    assert len(winner) == 4 and all(browser.execute_script("return arguments[0].naturalWidth", i) > 0 for i in winner)
    assert browser.find_element(By.ID, "winner").location["y"] < 900  # in the first screen, no scrolling
    cells = browser.find_elements(By.CSS_SELECTOR, "#trials-by-strength td.cell")
    assert len(cells) == 2 * 3  # trials x strengths
    assert "vs base (raw" in cells[1].get_attribute("title")
    cells[4].find_element(By.TAG_NAME, "a").click()
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Trial 1")

    study, _ = script_study
    copy = tmp_path / "smoke"
    shutil.copytree(study, copy)
    info = json.loads((copy / "trial_1" / "trial.json").read_text())
    (copy / "trial_1" / "trial.json").write_text(json.dumps({**info, "state": "running", "duration_s": None}))
    (copy / "trial_1" / "verdict.json").unlink()
    running = build_report(copy, tmp_path / "reports")
    browser.get(running.as_uri())
    assert browser.find_element(By.ID, "progress").text.startswith("Running (reload for news): 1 of 2 trials done")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#trials-by-strength td.cell")) == 3  # the finished trial
    assert all(ok for _, ok in _images_loaded(browser))
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_bench_report_times_a_grown_study_in_chromium(tmp_path, cache_dir, demo_dir):
    import json
    import sys

    proc = run_cli([sys.executable, "-m", "lora_lab.bench", "report", "--trials", "5", "--cache-dir",
                    str(cache_dir), "--out", str(tmp_path)],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "report.json").read_text())
    assert result["trials"] == 6 and 0 < result["page"]["load_s"] < 60
    assert result["page"]["images"] >= 6 * 3 and result["size"]["thumbs"] >= 6 * 3 * 2  # each trial its own
    assert "front page in Chromium: loaded in" in proc.stdout and "target < 2 s" in proc.stdout
    assert len(list((tmp_path / "report" / "big").glob("trial_*"))) == 6


def test_labels_by_click_and_key_survive_reloads_and_rewrites_then_calibrate_reads_them(browser, script_study,
                                                                                        tmp_path):
    import json
    import shutil
    import sys
    import time

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from lora_lab.report.study import build_report

    study, _ = script_study
    copy = tmp_path / "sweeps" / "smoke"
    shutil.copytree(study, copy)
    index = build_report(copy, tmp_path / "reports")
    browser.get(index.as_uri())

    def count():
        return browser.find_element(By.CSS_SELECTOR, "#labels .count").text

    def label_of(key, where=""):
        return browser.find_element(By.CSS_SELECTOR, f'{where} td[data-cell="{key}"]').get_attribute("data-label")

    assert count().startswith("0 labelled")
    cells = browser.find_elements(By.CSS_SELECTOR, "#trials-by-strength td[data-cell]")
    assert len(cells) == 2 * 2  # trials x LoRA strengths; the base model's column is not labelled
    ActionChains(browser).move_to_element(cells[0]).send_keys("o").perform()
    cells[2].find_element(By.CSS_SELECTOR, 'button[data-label="good"]').click()  # the other trial's
    assert count() == "2 labelled (0 underfit, 1 good, 1 overfit)"
    ActionChains(browser).move_to_element(cells[2]).send_keys("g").perform()  # the same key again: unlabelled
    assert count() == "1 labelled (0 underfit, 0 good, 1 overfit)"
    cells[2].find_element(By.CSS_SELECTOR, 'button[data-label="underfit"]').click()
    first, second = cells[0].get_attribute("data-cell"), cells[2].get_attribute("data-cell")

    def reads(text):  # a label may reach the page through a storage event: wait for it, up to 10 s
        WebDriverWait(browser, 10, poll_frequency=0.05).until(lambda b: count() == text,
                                                             f"the labels bar never read {text!r}")
        return True

    build_report(copy, tmp_path / "reports")  # the report rewritten (as after every trial), then reloaded
    browser.refresh()
    assert reads("2 labelled (1 underfit, 0 good, 1 overfit)")
    assert label_of(first) == "overfit" and label_of(second) == "underfit"
    front = browser.current_window_handle
    trial = first.split("/")[0]
    browser.switch_to.new_window("tab")  # the trial page beside the front page
    browser.get((index.parent / f"trial_{trial}" / "index.html").as_uri())
    assert label_of(first, "#cells-xy") == "overfit"  # the same cell on its trial page
    other = [c for c in browser.find_elements(By.CSS_SELECTOR, "#cells-xy td[data-cell]")
             if c.get_attribute("data-cell") not in (first, second)][0].get_attribute("data-cell")
    ActionChains(browser).move_to_element(browser.find_element(By.CSS_SELECTOR, f'#cells-xy td[data-cell="{other}"]')) \
        .send_keys("g").perform()
    assert count() == "3 labelled (1 underfit, 1 good, 1 overfit)"
    browser.close()
    browser.switch_to.window(front)  # the front page, not reloaded, shows the other tab's label
    assert reads("3 labelled (1 underfit, 1 good, 1 overfit)")

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    browser.find_element(By.CSS_SELECTOR, "#labels button.download").click()
    saved = downloads / "labels.json"
    for _ in range(100):
        if saved.exists() and saved.stat().st_size:
            break
        time.sleep(0.1)
    doc = json.loads(saved.read_text())
    got = {(x["trial"], x["epoch"], x["strength"]): x["label"] for x in doc["labels"]}
    assert doc["study"] == "smoke" and all(x["study"] == "smoke" and x["when"] for x in doc["labels"])
    key = lambda k: (int(k.split("/")[0]), int(k.split("/")[1]), float(k.split("/")[2]))  # noqa: E731
    assert got == {key(first): "overfit", key(second): "underfit", key(other): "good"}

    proc = run_cli([sys.executable, "-m", "lora_lab.calibrate", str(copy), str(saved), "--reports",
                    str(tmp_path / "reports")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 labels (1 underfit, 1 good, 1 overfit)" in proc.stdout and "cross-validated" in proc.stdout
    assert (copy / "judge.yaml").is_file() and list(copy.glob("trial_*/verdict.before-calibration-*.json"))
    browser.refresh()  # calibrate rewrote the report: the labels stay, the cells to label next are framed
    assert reads("3 labelled (1 underfit, 1 good, 1 overfit)")
    nxt = json.loads((copy / "labels_next.json").read_text())["cells"]
    pages = {c["trial"] for c in nxt}
    framed = 0
    for t in pages:
        browser.get((index.parent / f"trial_{t}" / "index.html").as_uri())
        framed += len(browser.find_elements(By.CSS_SELECTOR, "#cells-xy td.label-next"))
    assert framed == len(nxt) > 0
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
