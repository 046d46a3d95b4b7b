"""A live, line-per-event progress display of a search, as a Tune callback."""
from __future__ import annotations

import sys
import time

from ray.tune import Callback

from search.trial_runs import error_summary


class ProgressPrinter(Callback):
    def __init__(self, total_trials: int, total_epochs: int, stream=None):
        self.total_trials = total_trials
        self.total_epochs = total_epochs
        self.stream = stream  # None: whatever sys.stdout is when printing (Tune pickles its callbacks)
        self.started = time.monotonic()
        self.numbers: dict[str, int] = {}
        self.done = 0

    def __setstate__(self, state: dict) -> None:
        # A resumed search unpickles this printer from Tune's state: its clock starts again, rather than counting
        # the time the search was stopped.
        self.__dict__.update(state, started=time.monotonic())

    def _say(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {text}", file=self.stream or sys.stdout, flush=True)

    def _name(self, trial) -> str:
        number = self.numbers.setdefault(trial.trial_id, len(self.numbers) + 1)
        return f"trial {number}/{self.total_trials}"

    def on_trial_start(self, iteration, trials, trial, **info):
        spec = trial.config.get("spec", {})
        # The detector space's parts appear only where the space chose them.
        shape = ", ".join(f"{k}={spec[k]}" for k in ("image_size", "backbone_width", "backbone_depth",
                                                      "fpn_channels", "fpn_repeats", "neck", "head", "box_loss",
                                                      "assigner") if k in spec)
        again = trial.trial_id in self.numbers  # a retry after a failure, or a trial a --resume continues
        self._say(f"{self._name(trial)} {'restarted from its last checkpoint' if again else 'started'}: {shape}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        ap = result.get("map")
        ap_text = f"AP {ap:.3f}" if ap is not None else "AP -"
        # A replayed trial (search.replay) reports no loss: leave it out rather than print "loss nan".
        loss = result.get("loss")
        loss_text = f"loss {loss:.3f}, " if loss is not None else ""
        self._say(f"{self._name(trial)} epoch {result.get('epoch')}/{self.total_epochs}: {ap_text}, {loss_text}"
                  f"{result.get('gflops', 0):.3f} GFLOPs, {result.get('epoch_s', 0):.0f} s/epoch")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        ap = (trial.last_result or {}).get("map")
        self._say(f"{self._name(trial)} finished" + (f": AP {ap:.3f}" if ap is not None else "")
                  + f" ({self.done}/{self.total_trials} done)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        # The traceback is the run's error.txt (search/trial_runs.py); Tune's driver-side copy is in /tmp.
        has_traceback = bool(getattr(trial, "error_file", None))
        self._say(f"{self._name(trial)} did not train: {_last_line(trial)} ({self.done}/{self.total_trials} done)"
                  + ("; its traceback is error.txt in the trial's MLflow run" if has_traceback else ""))


def _last_line(trial) -> str:
    return error_summary(trial) or "error (see the trial's log)"
