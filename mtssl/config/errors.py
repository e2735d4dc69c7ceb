"""The error every config check raises."""


class ConfigError(ValueError):
    """An invalid config value; the message names the field and how to fix it."""
