"""The node's plain-Python parts: the one-slot frame buffer, the statistics, the parameter table."""
from __future__ import annotations

import threading
import time

from gemma4_agent.ros.frame_slot import LatestSlot
from gemma4_agent.ros.params import BY_NAME
from gemma4_agent.ros.stats import NodeStats


def test_latest_slot_keeps_the_newest_and_reports_replacements():
    slot = LatestSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True and slot.put(3) is True
    assert slot.take(timeout=0.0) == 3
    assert slot.take(timeout=0.01) is None
    assert slot.put(4) is False and slot.clear() is True and slot.clear() is False


def test_latest_slot_wakes_a_waiting_taker_and_close_releases_it():
    slot = LatestSlot()
    got = []
    taker = threading.Thread(target=lambda: got.append(slot.take(timeout=5.0)))
    taker.start()
    time.sleep(0.05)
    slot.put("frame")
    taker.join(1.0)
    assert got == ["frame"]
    started = time.monotonic()
    closer = threading.Timer(0.05, slot.close)
    closer.start()
    assert slot.take(timeout=5.0) is None and time.monotonic() - started < 1.0
    slot.reopen()
    slot.put("again")
    assert slot.take(0.0) == "again"


def test_stats_percentiles_and_bad_kinds():
    stats = NodeStats()
    for ms in range(1, 101):
        stats.latency("total", ms)
    assert stats.bad_image("truncated") == 1 and stats.bad_image("truncated") == 2
    stats.count("frames_received", 3)
    counts, bad, pct = stats.snapshot()
    assert counts["frames_received"] == 3 and counts["bad_images"] == 2
    assert bad["truncated"] == 2 and bad["empty"] == 0
    assert abs(pct["total"][50] - 50.5) < 1e-9 and abs(pct["total"][99] - 99.01) < 1e-6
    keys = dict(stats.key_values())
    assert keys["latency_ms.total.p90"] == "90.1" and keys["bad_images.truncated"] == "2"


def test_param_checks():
    assert BY_NAME["image_tokens"].check(280) is None
    assert "not one of" in BY_NAME["image_tokens"].check(300)
    assert "outside" in BY_NAME["budget_ms"].check(0.0)
    assert "must be a double" in BY_NAME["budget_ms"].check(500)
    assert "not one of" in BY_NAME["backend"].check("tflite")
    assert BY_NAME["autostart"].check(1) is not None  # an int is not a bool
