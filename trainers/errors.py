"""InputError: the base of every error about what a user gave, so a caller can catch them all cheaply."""


class InputError(Exception):
    """A file, key, field, name or argument the user gave cannot be used; the message names it.

    It lives in a module that imports nothing, so that the command line can catch every such error without
    importing torch, Ray and MLflow first (they cost it 5 to 10 s before any command ran)."""


class PredictError(InputError, LookupError):
    """A model, image or folder that prediction cannot use; the message names it."""
