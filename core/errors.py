"""The one error a user's mistake raises, at every layer: it sits below them all."""


class ConfigError(ValueError):
    """A user mistake: the message is one line saying what is wrong and how to fix it."""
