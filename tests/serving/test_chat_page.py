"""The chat page at ``/`` in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``) against the
real app over HTTP: chat, stream, rate, change one's mind, compare two answers, and the stored feedback."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.wait import WebDriverWait

from liveloop.db import make_engine
from liveloop.tables import Comparison, Completion, Feedback
from tests.conftest import REPO

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOT = REPO / "docs" / "chat-page.png"
KEY = "sk-alice-123"


def test_the_page_and_its_files_need_no_key_while_the_api_does(serve):
    with serve(api_keys=[f"alice:{KEY}"]) as url:
        page = httpx.get(f"{url}/")
        script = httpx.get(f"{url}/static/chat.js")
        api = httpx.get(f"{url}/v1/models")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/chat.js">' in page.text
    assert script.status_code == 200 and "/v1/feedback" in script.text
    assert api.status_code == 401 and api.json()["error"]["type"] == "authentication_error"


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[webdriver.Chrome]:
    """Headless Chromium through chromedriver, both from the system: Selenium Manager never downloads a browser."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        why = f"{', '.join(missing)} missing: `make test` installs Debian's chromium and chromium-driver as root"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(f"{why} (skipped only outside CI)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # explicit paths already skip Selenium Manager; this forbids downloads
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=860,760"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def _send(driver, text: str) -> None:
    driver.find_element(By.ID, "prompt").send_keys(text, Keys.ENTER)


def _answered(driver, count: int, timeout: float = 180):
    """The ``count``-th answer (a pair is two) once it has streamed to its end; the packaged model's 40 tokens
    took over a minute on 2 busy cores."""
    done = ".message.assistant:not(.streaming)"
    WebDriverWait(driver, timeout).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) >= count)
    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[count - 1]


def _press(driver, button) -> None:
    button.click()
    WebDriverWait(driver, 10).until(lambda _: button.get_attribute("aria-pressed") == "true")


def _rate(driver, answer, rating: str) -> None:
    _press(driver, answer.find_element(By.CSS_SELECTOR, f'.thumb[data-rating="{rating}"]'))


def _pressed(answer, selector: str) -> bool:
    return answer.find_element(By.CSS_SELECTOR, selector).get_attribute("aria-pressed") == "true"


def _use_key(driver, key: str) -> None:
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key, "\t")


@pytest.mark.slow
def test_a_user_chats_rates_and_changes_their_mind_in_chromium(serve, make_settings, browser, tmp_path):
    driver = browser
    # the packaged model, so that the screenshot shows a real answer
    with serve(base_model=None, api_keys=[f"alice:{KEY}"], default_max_tokens=40) as url:
        driver.get(url)
        key = driver.find_element(By.ID, "api-key")
        key.send_keys("sk-wrong", "\t")
        _send(driver, "What is the sea?")
        error = driver.find_element(By.ID, "error")
        WebDriverWait(driver, 10).until(lambda _: error.is_displayed())
        assert "Incorrect API key" in error.text and "401" in error.text
        assert driver.find_element(By.ID, "prompt").get_attribute("value") == "What is the sea?"  # to send again

        driver.refresh()  # the key is kept in localStorage
        key = driver.find_element(By.ID, "api-key")
        assert key.get_attribute("value") == "sk-wrong"
        key.clear()
        key.send_keys(KEY, "\t")
        _send(driver, "What is the sea?")
        first = _answered(driver, 1)
        _send(driver, "Say it in one sentence.")
        second = _answered(driver, 2)
        _rate(driver, second, "up")
        _rate(driver, second, "down")  # a change of mind
        assert second.find_element(By.CSS_SELECTOR, '.thumb[data-rating="up"]').get_attribute("aria-pressed") == "false"
        assert not driver.find_element(By.ID, "error").is_displayed()
        base_model = httpx.get(f"{url}/readyz").json()["model"]

    first_id, second_id = first.get_attribute("data-completion-id"), second.get_attribute("data-completion-id")
    engine = make_engine(make_settings().resolved_database_url)
    with engine.connect() as conn:
        completions = {row.id: row for row in conn.execute(sa.select(Completion))}
        ratings = conn.execute(sa.select(Feedback.rating).where(Feedback.completion_id == second_id)
                               .order_by(Feedback.revision)).scalars().all()
    engine.dispose()
    assert ratings == ["up", "down"]  # the latest revision is the down
    stored_first, stored_second = completions[first_id], completions[second_id]
    assert stored_second.user_id == "alice"
    assert stored_second.adapter_version is None  # nothing trained yet: the base model answered, and says so
    assert second.find_element(By.CSS_SELECTOR, ".model").text == f"answered by {base_model}"
    assert stored_second.messages == [  # the conversation so far went with the second question
        {"role": "user", "content": "What is the sea?"},
        {"role": "assistant", "content": stored_first.response_text},
        {"role": "user", "content": "Say it in one sentence."},
    ]


@pytest.mark.slow
def test_comparison_mode_shows_two_answers_blind_and_ranks_them_in_chromium(serve, make_settings, browser,
                                                                            tmp_path):
    driver = browser
    with serve(base_model=None, api_keys=[f"alice:{KEY}"], default_max_tokens=40) as url:
        driver.get(url)
        _use_key(driver, "sk-wrong")
        driver.find_element(By.ID, "compare").click()
        _send(driver, "Name a colour.")
        error = driver.find_element(By.ID, "error")
        WebDriverWait(driver, 10).until(lambda _: error.is_displayed())
        assert "Incorrect API key" in error.text and not driver.find_elements(By.CSS_SELECTOR, ".comparison")

        driver.refresh()  # comparison mode is kept, as the key is
        assert driver.find_element(By.ID, "compare").is_selected()
        _use_key(driver, KEY)
        _send(driver, "Name a colour.")
        first, second = _answered(driver, 1), _answered(driver, 2)
        pair = driver.find_element(By.CSS_SELECTOR, ".comparison")
        assert pair.find_elements(By.CSS_SELECTOR, ".message.assistant") == [first, second]  # side by side
        assert first.location["y"] == second.location["y"] and first.location["x"] < second.location["x"]
        for answer in (first, second):
            assert answer.find_element(By.CSS_SELECTOR, ".prefer").is_displayed()
            assert not answer.find_element(By.CSS_SELECTOR, ".thumbs").is_displayed()
            assert answer.find_element(By.CSS_SELECTOR, ".model").text == ""  # blind: no version shown
        _press(driver, second.find_element(By.CSS_SELECTOR, ".prefer"))
        _press(driver, first.find_element(By.CSS_SELECTOR, ".prefer"))  # a change of mind
        assert not _pressed(second, ".prefer") and first.find_element(By.CSS_SELECTOR, ".status").text == (
            "Thanks: recorded.")

        _use_key(driver, "sk-wrong")  # a ranking the server refuses says so, and changes nothing shown
        second.find_element(By.CSS_SELECTOR, ".prefer").click()
        status = second.find_element(By.CSS_SELECTOR, ".status")
        WebDriverWait(driver, 10).until(lambda _: status.text.startswith("Not recorded:"))
        assert "Incorrect API key" in status.text and _pressed(first, ".prefer") and not _pressed(second, ".prefer")

        _use_key(driver, KEY)
        driver.find_element(By.ID, "compare").click()  # back to one answer: thumbs, and the version shown
        _send(driver, "Say it in one sentence.")
        single = _answered(driver, 3)
        _rate(driver, single, "up")
        base_model = httpx.get(f"{url}/readyz").json()["model"]
        assert single.find_element(By.CSS_SELECTOR, ".model").text == f"answered by {base_model}"
        assert base_model not in pair.get_attribute("innerHTML")
        assert not driver.find_element(By.ID, "error").is_displayed()
        shot = tmp_path / "chat-page.png"
        driver.save_screenshot(str(shot))

    first_id, second_id = first.get_attribute("data-completion-id"), second.get_attribute("data-completion-id")
    single_id = single.get_attribute("data-completion-id")
    engine = make_engine(make_settings().resolved_database_url)
    with engine.connect() as conn:
        completions = {row.id: row for row in conn.execute(sa.select(Completion))}
        rankings = conn.execute(sa.select(Comparison.ranking).order_by(Comparison.revision)).scalars().all()
        ratings = conn.execute(sa.select(Feedback.completion_id, Feedback.rating)).all()
    engine.dispose()
    assert rankings == [[second_id, first_id], [first_id, second_id]]  # the latest prefers the first
    assert completions[first_id].request_id == completions[second_id].request_id is not None
    assert [tuple(r) for r in ratings] == [(single_id, "up")]
    assert completions[single_id].messages == [  # the conversation went on from the answer preferred
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": completions[first_id].response_text},
        {"role": "user", "content": "Say it in one sentence."},
    ]
    assert shot.stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOT"):  # the README's picture; answers are sampled, so on request
        shutil.copyfile(shot, SCREENSHOT)
