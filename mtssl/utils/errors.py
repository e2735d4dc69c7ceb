"""The error every config check raises, here at the bottom layer so any layer can raise it (a process group
refusing a device layout, the data step refusing a folder) without importing the config package."""


class ConfigError(ValueError):
    """An invalid config value; the message names the field and how to fix it."""
