"""The Pareto-aware successive-halving stopper: its rungs, and which trials each rung continues."""
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from search.scheduler import ParetoSuccessiveHalving, rung_milestones

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


@pytest.mark.parametrize("grace, eta, epochs, expected", [
    (2, 3, 6, [2]), (2, 3, 7, [2, 6]), (1, 3, 10, [1, 3, 9]), (1, 2, 8, [1, 2, 4]), (4, 3, 4, []), (1, 1.5, 4, [1, 2, 3]),
])
def test_rungs_lie_below_the_last_epoch(grace, eta, epochs, expected):
    assert rung_milestones(grace, eta, epochs) == expected


def _report(scheduler, trial_id, epoch, ap, gflops):
    # The scheduler reads only the trial's id from Tune's Trial.
    return scheduler.on_trial_result(None, SimpleNamespace(trial_id=trial_id), {"epoch": epoch, "map": ap,
                                                                                 "gflops": gflops})


def test_a_rung_keeps_the_cheapest_trial_that_ranking_on_ap_alone_would_stop():
    """Three trials reach the rung at epoch 2, costly first. With eta 3, the best third continues, ties included.
    The dominated one is stopped. The cheap, slow learner shares the front with the costly one, as its other
    extreme, so it continues, where ASHA on AP (cutoff: the 67th percentile of 0.40, 0.30, 0.10) would stop it."""
    scheduler = ParetoSuccessiveHalving(max_epochs=6, grace_period=2, reduction_factor=3)
    assert _report(scheduler, "costly", 2, 0.40, 0.20) == CONTINUE  # the first to arrive always continues
    assert _report(scheduler, "dominated", 2, 0.30, 0.25) == STOP  # worse and dearer than "costly"
    assert _report(scheduler, "cheap", 2, 0.10, 0.05) == CONTINUE
    assert scheduler.stopped == ["dominated"]


def test_results_without_ap_wait_for_the_next_scored_epoch():
    """With eval_every 2 and grace 1, epoch 1 has no AP: the rung at 1 is decided at epoch 2, on epoch 2's AP."""
    scheduler = ParetoSuccessiveHalving(max_epochs=9, grace_period=1, reduction_factor=3)
    first = SimpleNamespace(trial_id="a")
    assert scheduler.on_trial_result(None, first, {"epoch": 1, "gflops": 0.1}) == CONTINUE
    assert scheduler.rungs[1] == {}
    assert _report(scheduler, "a", 2, 0.3, 0.1) == CONTINUE
    assert scheduler.rungs[1] == {"a": (0.3, 0.1)}
    assert _report(scheduler, "b", 2, 0.2, 0.2) == STOP  # dominated by a at the rung at epoch 1
    assert _report(scheduler, "a", 4, 0.5, 0.1) == CONTINUE and scheduler.rungs[3] == {"a": (0.5, 0.1)}


def test_a_crowded_middle_point_is_stopped_and_a_later_front_extreme_continues():
    """After the cheapest and the most accurate trial, a point between them has a finite crowding distance and,
    with one kept in three, stops; a new cheapest point is an extreme and continues; a late point that the first
    cheapest dominates stops."""
    scheduler = ParetoSuccessiveHalving(max_epochs=6, grace_period=2, reduction_factor=3)
    assert _report(scheduler, "cheap", 2, 0.10, 0.01) == CONTINUE
    assert _report(scheduler, "accurate", 2, 0.90, 0.50) == CONTINUE  # both extremes of the front: tied first
    assert _report(scheduler, "middle", 2, 0.50, 0.20) == STOP
    assert _report(scheduler, "cheaper", 2, 0.15, 0.005) == CONTINUE
    assert _report(scheduler, "late", 2, 0.05, 0.02) == STOP  # dominated by cheap
    assert scheduler.stopped == ["middle", "late"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="reduction_factor"):
        ParetoSuccessiveHalving(max_epochs=6, reduction_factor=1)
