"""The kill -9 harness, short: devices upload while the daemon is SIGKILLed and restarted (also at the
fault point between an upload's commit and its answer); every round's model must equal the mean of
exactly the updates the devices were told were accepted. The long run: `python -m bench.chaos`."""

from __future__ import annotations

from bench import chaos


def test_kill_nine_under_load_counts_every_accepted_update_exactly_once() -> None:
    figures = chaos.run(kills=5, devices=6, rounds=25, kill_every=0.3, crash_after_commit=True,
                        max_seconds=240, seed=3)
    assert figures["state"] == "finished"
    assert figures["rounds_verified"] == figures["rounds_completed"] == 25
    assert figures["kills"] >= 3
    assert figures["server_errors_5xx"] == 0
