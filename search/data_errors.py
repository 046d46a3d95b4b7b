"""After a trial fails on the data (an image it cannot read), the search starts no new trial: each would fail alike."""
from __future__ import annotations

import re
from typing import Callable

from ray.tune import Callback

from search.trial_runs import error_summary
from trainers.validate import DataError

# The line error_summary finds for a DataError raised in a trial, or in one of its workers: the class's qualified
# name, as a traceback prints it (any other class that happens to be called DataError is not one).
_DATA_ERROR = re.compile(rf"^{re.escape(f'{DataError.__module__}.{DataError.__qualname__}')}: (?P<message>.+)$")


def data_error_of(trial) -> str:
    """The DataError message a failed trial ended with ("PATH: cannot read image id 7: ..."), or ""."""
    match = _DATA_ERROR.match(error_summary(trial))
    return match["message"] if match else ""


class StopAtDataError(Callback):
    """Calls halt(message) at a trial's first DataError. Not every bad image is found before a search: with
    data.check headers or sample, a truncated one is found by the first trial to decode it. The data is the same
    for every trial, so the next would fail on it too; a diverging loss, by contrast, is one configuration's, and
    the search goes on after it. The first failure counts, before Tune retries the trial (resources.max_failures):
    Tune has no way to skip the retry of an error that cannot pass, so the retry runs, but no new trial starts."""

    def __init__(self, halt: Callable[[str], None]):
        self.halt = halt

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._check(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._check(trial)

    def _check(self, trial) -> None:
        message = data_error_of(trial)
        if message:
            self.halt(message)
