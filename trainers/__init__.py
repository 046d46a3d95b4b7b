"""How one configuration is trained and measured: ModelSpec -> effdet model, data, loop, evaluation, cost."""
from trainers.spec import ModelSpec, SpecError

__all__ = ["ModelSpec", "SpecError"]
