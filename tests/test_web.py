"""`python -m mllm.web` on a tiny random export, driven in headless Chromium with selenium: a bad
question, a question about an uploaded image, one generated image, and a screenshot."""
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from launch_utils import ROOT, free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        return "gradio is not installed (pip install gradio)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not CHROMIUM or not CHROMEDRIVER:
        return "Debian chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The web app on a free loopback port; yields (url, tmp dir); stopped at teardown."""
    from test_chat import env, make_tiny_export

    d = tmp_path_factory.mktemp("web")
    export, tok = make_tiny_export(d)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 32, 3), dtype=np.uint8)).save(d / "photo.png")
    port = free_port()
    log = open(d / "server.log", "w")
    e = env()
    e["GRADIO_ANALYTICS_ENABLED"] = "False"
    proc = subprocess.Popen([sys.executable, "-m", "mllm.web", "--model", str(export), "--tokenizer", str(tok),
                             "--image-size", "32", "--device", "cpu", "--port", str(port), "--out-dir", str(d / "out"),
                             "--max-new-tokens", "8"], cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited ({proc.returncode}):\n{(d / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"server did not come up:\n{(d / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, d
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions", "--disable-sync", "--no-first-run",
                 "--disable-default-apps", "--disable-component-update", "--window-size=1280,1400",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_ask_about_image_and_generate(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, d = server
    log = (d / "server.log").read_text()
    assert f"serving on {url.rstrip('/')}" in log  # loopback by default
    wait = WebDriverWait(browser, 60)
    css = browser.find_element
    browser.get(url)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#question textarea"))

    # an empty question is refused with a one-line message; the page keeps working
    css(By.CSS_SELECTOR, "#ask-btn").click()
    wait.until(lambda b: "error: empty question" in b.find_element(By.CSS_SELECTOR, "#chat-status").text)

    # upload an image and ask about it
    css(By.CSS_SELECTOR, "#image-input input[type=file]").send_keys(str(d / "photo.png"))
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image-input img"))
    css(By.CSS_SELECTOR, "#question textarea").send_keys("What is in the image?")
    css(By.CSS_SELECTOR, "#ask-btn").click()
    wait.until(lambda b: "What is in the image? [+1 image(s)]" in b.find_element(By.CSS_SELECTOR, "#chatbot").text)
    # the image and the question now belong to the conversation, so their boxes are cleared
    wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, "#image-input img"))
    assert css(By.CSS_SELECTOR, "#question textarea").get_attribute("value") == ""
    assert "error" not in css(By.CSS_SELECTOR, "#chat-status").text
    # a follow-up question continues the same conversation
    css(By.CSS_SELECTOR, "#question textarea").send_keys("And what color is it?")
    css(By.CSS_SELECTOR, "#ask-btn").click()
    wait.until(lambda b: "And what color is it?" in b.find_element(By.CSS_SELECTOR, "#chatbot").text)
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#question textarea").get_attribute("value") == "")
    text = css(By.CSS_SELECTOR, "#chatbot").text
    assert text.index("[+1 image(s)]") < text.index("And what color is it?")
    browser.save_screenshot(str(tmp_path / "chat.png"))

    # generate one image
    next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text.strip() == "Generate").click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gen-prompt textarea"))
    css(By.CSS_SELECTOR, "#gen-prompt textarea").send_keys("a red circle on a blue background")
    css(By.CSS_SELECTOR, "#gen-btn").click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gallery img"))
    wait.until(lambda b: "saved 1 image(s)" in b.find_element(By.CSS_SELECTOR, "#gen-status").text)
    pngs = list((d / "out").glob("*.png"))
    assert len(pngs) == 1 and Image.open(pngs[0]).size == (32, 32)
    assert str(pngs[0]) in css(By.CSS_SELECTOR, "#gen-status").text
    shot = tmp_path / "web.png"
    assert browser.save_screenshot(str(shot))
    img = Image.open(shot)
    assert img.size[0] >= 1000 and np.asarray(img.convert("L")).std() > 5  # a rendered page, not a blank one
    assert os.path.getsize(tmp_path / "chat.png") > 1000
