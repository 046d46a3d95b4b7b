"""A trial's outcome, named once for Optuna (a user attribute), MLflow (a run tag) and the frontier."""
STATE_TAG = "effsearch.state"

COMPLETE = "complete"  # trained every epoch it was given: the only state that forms the frontier
PRUNED = "pruned"  # stopped early by the scheduler
INFEASIBLE = "infeasible"  # over the FLOPs budget when proposed: never trained, never a Ray trial
FAILED = "failed"  # raised, diverged, ran out of memory, or was interrupted
STATES = (COMPLETE, PRUNED, INFEASIBLE, FAILED)

# In a trial's last report: 1 when it ran every epoch it was given (the trainer sets it).
FULL_BUDGET_KEY = "full_budget"
