"""The engine's turn clock: a decode turn over a second is logged at INFO (a step shape compiled on
a request's time), and at DEBUG one line a second says where the engine's time went."""

from __future__ import annotations

import logging

from qwen3_mlx.server import turns


def test_a_slow_decode_turn_is_logged_at_info(caplog):
    clock = turns.TurnClock()
    with caplog.at_level(logging.INFO, logger="qwen3_mlx.server"):
        clock.turn(0.0, 0.0, 0.01, 4, "[4]")
        clock.turn(0.0, 0.0, 2.5, 5, "[8]")
    slow = [r.getMessage() for r in caplog.records]
    assert slow == ["decode turn: 5 rows (slots [8]) took 2.50 s (a new step shape compiled?)"]


def test_debug_summary_sums_a_window_and_stays_quiet_when_idle(caplog, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(turns.time, "perf_counter", lambda: now[0])
    clock = turns.TurnClock()
    with caplog.at_level(logging.DEBUG, logger="qwen3_mlx.server"):
        for _ in range(4):
            now[0] += 0.3
            clock.turn(0.001, 0.1, 0.2, 3, "[4]")
        now[0] += 1.5
        clock.turn(0.0, 0.0, 0.0, 0, "[]")  # an idle window says nothing
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "4 turns, 4 decode steps of 3-3 rows" in lines[0]
    assert "GB active" in lines[0] and "GB cached" in lines[0]
    assert "prefill 0.400 s, decode 0.800 s" in lines[0]
