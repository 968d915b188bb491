"""One exception type for everything a user can get wrong, so callers (nodes, CLI) can show its text as is."""


class ZImageError(Exception):
    """A problem with the user's input or files; the message names the file or value and says what to do."""
