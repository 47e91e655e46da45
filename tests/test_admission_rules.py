"""Admission's decisions as plain functions (`engine.rules`): rate windows, fairness keys, priorities
and why a task waits. No database: the database's admission is checked against these in test_pgsql."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workflows_app.engine import rules
from workflows_app.engine.rules import KeyState, Rate, RateLog, Waiting

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("text", "rate"),
    [("5/second", Rate(5, 1)), ("120/minute", Rate(120, 60)), ("3/hour", Rate(3, 3600)), (None, None)],
)
def test_a_rate_limit_reads_n_per_second_minute_or_hour(text, rate):
    assert rules.rate_parse(text) == rate
    if rate:
        assert rules.rate_parse(rate.text) == rate


@pytest.mark.parametrize(
    "text", ["5/fortnight", "-1/second", "0/second", "five/second", "5", "5/", 5, "1.5/second", "05/second", " 5/hour"]
)
def test_a_malformed_rate_limit_is_refused_with_what_is_wrong(text):
    with pytest.raises(ValueError, match="N/second|whole number|string"):
        rules.rate_parse(text)


def test_a_full_window_opens_when_its_oldest_counted_dispatch_leaves_it():
    rate = Rate(3, 1)
    log = rules.rate_record(RateLog(), at(0), at(0), 2, rate)
    log = rules.rate_record(log, at(0.5), at(0.5), 1, rate)
    assert rules.rate_used(log, at(0.6), rate) == 3
    # The two at 0 leave the window at 1.0; then one more fits.
    assert rules.rate_opens(log, at(0.6), rate) == at(1.0)
    assert rules.rate_used(log, at(1.0), rate) == 1
    # Nothing to wait for while the window has room.
    assert rules.rate_opens(log, at(1.2), rate) == at(1.2)


def test_the_record_forgets_what_no_window_counts_and_stays_small():
    rate = Rate(1000, 60)
    log = RateLog()
    for i in range(5000):  # a dispatch every 12 ms for a minute
        log = rules.rate_record(log, at(i * 0.012), at(i * 0.012), 1, rate)
    assert len(log.times) <= rules.RATE_RESOLUTION + 2
    assert list(log.times) == sorted(log.times)
    assert rules.rate_used(log, at(60), rate) <= 5000


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 6),
    period=st.sampled_from([1, 60]),
    steps=st.lists(
        st.tuples(st.floats(0, 0.7), st.integers(0, 4), st.one_of(st.none(), st.floats(0, 3))), min_size=1, max_size=40
    ),
)
def test_no_window_ever_holds_more_dispatches_than_the_limit(count, period, steps):
    """Admissions at increasing times take what `rate_used` leaves, retries take `rate_opens` from their
    due time: every window of the period, over every dispatch time recorded, holds at most `count`."""
    rate = Rate(count, period)
    log, now, times = RateLog(), 0.0, []
    for gap, wanted, retry_in in steps:
        now += gap * period
        if retry_in is not None:
            due = rules.rate_opens(log, at(now + retry_in * period), rate)
            log = rules.rate_record(log, at(now), due, 1, rate)
            times.append(due)
        took = min(wanted, count - rules.rate_used(log, at(now), rate))
        if took > 0:
            log = rules.rate_record(log, at(now), at(now), took, rate)
            times.extend([at(now)] * took)
    times.sort()
    for i, start in enumerate(times):
        inside = [t for t in times[i:] if t < start + timedelta(seconds=period)]
        assert len(inside) <= count


def w(priority: int, run: float, ready: float, id_: int, key: str = "") -> Waiting:
    return Waiting(priority, at(run), at(ready), id_, key)


def test_without_keys_the_line_goes_by_priority_then_the_runs_age_then_readiness():
    line = [w(5, 2, 2, 1), w(5, 1, 3, 2), w(9, 3, 3, 3), w(5, 1, 1, 4), w(0, 0, 0, 5)]
    assert [t.id for t in rules.admit(free=5, line=line)] == [3, 4, 2, 1, 5]
    assert [t.id for t in rules.admit(free=2, line=line)] == [3, 4]
    assert rules.admit(free=0, line=line) == []


def test_keys_are_served_in_turn_so_a_small_key_is_not_held_back_by_a_big_one():
    big = [w(5, i, i, i, "A") for i in range(200)]
    small = [w(5, 500, 500, 1000, "B"), w(5, 501, 501, 1001, "B")]
    # A was served last at turn 7, B never: B first, then they alternate.
    order = rules.admit(free=5, line=big + small, keys={"A": KeyState(0, 7)}, turn=7)
    assert [t.key for t in order] == ["B", "A", "B", "A", "A"]


def test_a_key_holding_its_share_waits_while_others_are_served():
    line = [w(5, i, i, i, "A") for i in range(10)] + [w(5, 50, 50, 99, "B")]
    order = rules.admit(free=3, line=line, keys={"A": KeyState(1, 1)}, per_key=2)
    assert [t.key for t in order] == ["B", "A"]  # A had 1 of 2: one more, then only B could go


def test_priority_goes_before_the_turn_of_keys():
    line = [w(5, 0, 0, 1, "A"), w(9, 9, 9, 2, "B"), w(5, 0, 0, 3, "C")]
    order = rules.admit(free=3, line=line, keys={"B": KeyState(0, 100)}, turn=100)
    assert [t.id for t in order] == [2, 1, 3]


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"concurrency": 3, "held": 1, "per_key": 2, "key": "A", "key_held": 2, "place": 1}, "key_share"),
        ({"concurrency": 3, "held": 3, "place": 4}, "concurrency"),
        (
            {"concurrency": 3, "held": 1, "rate": Rate(5, 1), "rate_used": 5, "rate_opens": at(1), "place": 1},
            "rate_window",
        ),
        ({"concurrency": 3, "held": 1, "rate": Rate(5, 1), "rate_used": 2, "place": 3}, "place"),
    ],
)
def test_a_waiting_task_says_the_first_reason_that_holds(kwargs, code):
    reason = rules.wait_reason(**kwargs)
    assert reason.code == code
    if code == "rate_window":
        assert "next slot opens at 00:00:01.000" in reason.text
    if code == "place":
        assert reason.text.startswith("place 3 in line: 2 ahead")


def test_a_queue_timeout_fails_the_task_without_retries_and_says_how_long_it_waited():
    outcome = rules.queue_timeout_outcome(waited=30, event_type="llm")
    assert (outcome.status, outcome.error, outcome.retry_in) == ("FAILURE", "waited 30 s for a slot of llm", None)


@pytest.mark.parametrize(
    ("value", "key"), [(None, ""), ("shop-1", "shop-1"), (17, "17"), (True, "true"), ("x" * 300, "x" * 200)]
)
def test_a_fairness_key_is_stored_as_text(value, key):
    assert rules.fairness_key_of(value) == key
