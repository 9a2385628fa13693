"""bench/sigkill.py's bookkeeping (no training here): which kills count as landing while training,
how long it waits before a kill, and when it fails."""

from __future__ import annotations

import random
import sys

from tests.conftest import REPO


def _sigkill():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import sigkill
    finally:
        sys.path.remove(str(REPO / "bench"))
    return sigkill


def test_a_kill_counts_as_while_training_only_when_latest_moved_during_the_attempt():
    Kill = _sigkill().Kill
    assert Kill(None, 3, False, 9.0, 0.2).while_training
    assert Kill(3, 5, True, 4.0, 0.1).while_training
    assert not Kill(None, None, False, 9.0, None).while_training   # killed during start-up
    assert not Kill(5, 5, True, 4.0, None).while_training          # resumed, killed before a new checkpoint


def test_kill_delay_stays_within_the_window_and_half_the_time_left():
    kill_delay = _sigkill().kill_delay
    rng = random.Random(0)
    delays = [kill_delay(rng, 1.0, 0.1, 300) for _ in range(200)]
    assert all(0 <= d <= 1.0 for d in delays) and max(delays) > 0.5
    assert all(0 <= kill_delay(rng, 10.0, 0.1, 4) <= 0.2 for _ in range(200))


def test_failures_name_every_reason_and_pass_only_when_kills_landed_while_training():
    sk = _sigkill()
    good = sk.Tally(kills=20, training=18, in_write=5)
    assert sk.failures(good, 10, True, True) == []
    assert len(sk.failures(sk.Tally(kills=20, training=9), 10, True, True)) == 1
    assert "landed while training" in sk.failures(sk.Tally(kills=20, training=0), 0, True, True)[0]
    bad = sk.Tally(kills=20, training=20, lost=1, backwards=1, broken=1)
    assert len(sk.failures(bad, 10, False, False)) == 5


def test_tally_counts_kills():
    sk = _sigkill()
    t = sk.Tally()
    kills = (sk.Kill(None, None, False, 5.0, None), sk.Kill(None, 2, True, 7.0, 0.1), sk.Kill(2, 6, False, 3.0, 0.3))
    for kill in kills:
        t.add(kill)
    assert (t.kills, t.training, t.in_write) == (3, 2, 1)
