"""User-facing errors: one message that says what was wrong and what to do."""


class LmlabError(ValueError):
    """A problem with the user's input or configuration, reported without a traceback."""
