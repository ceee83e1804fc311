"""The console in a real browser: headless Chromium (Debian's chromium and chromium-driver)
driven by selenium against `feedloop serve` with API keys and `feedloop console` in front of
it. Each mode's action is checked in the replay store, not only on the page: the event's kind,
content and the rater's identity. Skipped, saying why, where Chromium or selenium is missing.

FEEDLOOP_CONSOLE_SCREENSHOTS=DIR saves a PNG of each mode there (docs/console/ holds them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_stack import Rater, browser_available, console_stack, start_browser

from feedloop.core.store import ReplayStore, open_store

pytestmark = pytest.mark.skipif(browser_available() is not None, reason=str(browser_available()))
SHOTS = (
    Path(os.environ["FEEDLOOP_CONSOLE_SCREENSHOTS"])
    if os.environ.get("FEEDLOOP_CONSOLE_SCREENSHOTS")
    else None
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Any]:
    with console_stack(tmp_path_factory.mktemp("console"), tiny_checkpoint, tiny_checkpoint) as s:
        yield s


@pytest.fixture(scope="module")
def driver(stack) -> Iterator[Any]:
    browser = start_browser()
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def store(stack) -> Iterator[ReplayStore]:
    opened = open_store(str(stack.store_path))
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def ann(driver, stack) -> Rater:
    rater = Rater(driver, stack.url)
    rater.sign_in("ann")
    assert rater.find("#rater").text == "ann"
    return rater


def stored(store: ReplayStore, event_id: str) -> Any:
    events = [e for e in store.feedback_after(0, 10_000) if e.event_id == event_id]
    assert len(events) == 1, f"event {event_id} stored {len(events)} times"
    return events[0]


def test_rate_shows_the_scale_and_stores_the_rating(ann, store):
    ann.open("rate")
    ann.ask("ocean sunrise")
    assert ann.find("#scale").text == "1 to 5 stars (5 is best)"
    first = ann.finds(".candidate")[0]
    text = first.find_element("css selector", ".text").text
    ann.screenshot(SHOTS, "rate")
    ann.after(lambda: first.find_element("css selector", "button[value='4']").click())
    kind, message, event_id, outcome = ann.notice()
    assert (kind, outcome) == ("ack", "accepted") and text in message
    event = stored(store, event_id)
    assert (event.kind, event.score, event.scale, event.client_id) == (
        "rating",
        4.0,
        "stars5",
        "ann",
    )
    generation = store.get_generations(event.generation_ids)[event.generation_ids[0]]
    assert (generation.text or "(empty phrase)") == text and generation.client_id == "ann"


def test_rank_stores_the_order_the_rater_gave(ann, store):
    ann.open("rank")
    ann.ask("garden")
    selects = ann.finds("select")
    names = [s.get_attribute("name").removeprefix("rank_") for s in selects]
    from selenium.webdriver.support.ui import Select

    for i, select in enumerate(selects):  # the reverse of the order shown
        Select(select).select_by_value(str(len(selects) - i))
    ann.screenshot(SHOTS, "rank")
    ann.after(lambda: ann.find("#submit-ranking").click())
    kind, _, event_id, _ = ann.notice()
    assert kind == "ack"
    event = stored(store, event_id)
    assert event.kind == "ranking" and event.generation_ids == names[::-1]


def test_compare_by_keyboard_stores_the_preference(ann, store):
    ann.open("compare")
    ann.ask("rain")
    left = ann.find("#prefer-left").get_attribute("value")
    right = ann.find("#prefer-right").get_attribute("value")
    ann.screenshot(SHOTS, "compare")
    ann.keys("2")  # the right one is better
    kind, _, event_id, _ = ann.notice()
    assert kind == "ack"
    event = stored(store, event_id)
    assert (event.kind, event.generation_ids, event.client_id) == (
        "comparison",
        [right, left],
        "ann",
    )


def test_correct_stores_the_edit_and_refuses_an_empty_one(ann, store):
    ann.open("correct")
    ann.ask("candle")
    before = store.counts().feedback
    box = ann.find("#correction-0")
    box.clear()
    ann.after(lambda: ann.find("#submit-correction-0").click())
    kind, message, _, _ = ann.notice()
    assert kind == "error" and "empty" in message and "Nothing was stored" in message
    assert store.counts().feedback == before
    box = ann.find("#correction-0")
    box.clear()
    box.send_keys("a quiet candle at night")
    ann.screenshot(SHOTS, "correct")
    ann.after(lambda: ann.find("#submit-correction-0").click())
    kind, _, event_id, _ = ann.notice()
    assert kind == "ack"
    event = stored(store, event_id)
    assert (event.kind, event.text) == ("correction", "a quiet candle at night")


def test_a_stale_page_gets_a_message_and_stores_nothing(ann, store, driver):
    ann.open("rate")
    ann.ask("coffee")
    old_window = driver.current_window_handle
    driver.switch_to.new_window("tab")  # the same rater moves on in another tab
    ann.open("rate")
    ann.ask("autumn leaves")
    driver.close()
    driver.switch_to.window(old_window)
    before = store.counts().feedback
    first = ann.finds(".candidate")[0]
    ann.after(lambda: first.find_element("css selector", "button[value='5']").click())
    kind, message, _, _ = ann.notice()
    assert kind == "error" and "stale candidate" in message
    assert store.counts().feedback == before


def test_a_blind_evaluation_session_by_keyboard_stores_verdicts_and_comparisons(
    driver, stack, store
):
    bob = Rater(driver, stack.url)
    bob.sign_in("bob")
    bob.open("evaluate")
    for field, value in (("#version_a", "v0002"), ("#version_b", "v0001")):
        bob.find(field).clear()
        bob.find(field).send_keys(value)
    bob.find("#prompts").clear()
    bob.find("#prompts").send_keys("ocean sunrise\ngarden\nrain\ncandle")
    bob.after(lambda: bob.find("#start-evaluation").click())
    shown = []
    for key in ("1", "t", "b", "2"):  # left, tie, both bad, right
        assert "Pair" in bob.find("#progress").text
        # Blind: nothing on the page names a version.
        assert "v0001" not in driver.page_source and "v0002" not in driver.page_source
        shown.append((bob.find("#eval-prompt").text, bob.find("#left-text").text))
        if key == "1":
            bob.screenshot(SHOTS, "evaluate")
        bob.keys(key)
        kind, _, _, outcome = bob.notice()
        assert (kind, outcome) == ("ack", "accepted")
    assert "Version A was v0002" in bob.find("#revealed").text
    bob.screenshot(SHOTS, "evaluate-revealed")
    verdicts = store.verdicts_between("v0002", "v0001")
    assert len(verdicts) == 4 and {v.rater for v in verdicts} == {"bob"}
    assert len({v.session_id for v in verdicts}) == 1
    by_prompt = {v.prompt: v for v in verdicts}
    expected = {"1": "left", "t": "tie", "b": "both_bad", "2": "right"}
    for (prompt, left_text), key in zip(shown, expected, strict=True):
        v = by_prompt[prompt]
        side = expected[key]
        if side in ("left", "right"):
            # The side pressed is A's when A was shown there.
            assert v.choice == ("a" if (side == "left") == v.a_shown_left else "b")
            winner = v.generation_id_a if v.choice == "a" else v.generation_id_b
            comparison = stored(store, v.verdict_id + "/comparison")
            assert comparison.generation_ids[0] == winner and comparison.client_id == "bob"
        else:
            assert v.choice == side
        left_id = v.generation_id_a if v.a_shown_left else v.generation_id_b
        text = store.get_generations([left_id])[left_id].text
        assert (text or "(empty phrase)") == left_text
    assert "4 verdicts" in bob.find("#report").text  # the admin report, over every rater
