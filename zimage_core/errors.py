"""One exception type for everything a user can get wrong, so callers (nodes, CLI) can show its text as is."""


class ZImageError(Exception):
    """A problem with the user's input or files; the message names the file or value and says what to do."""


class ZImageInterrupted(Exception):
    """Sampling was cancelled by the caller between blocks or steps; the model is left ready for the next run."""
