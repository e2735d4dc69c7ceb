"""The error every config check raises (defined in mtssl.utils.errors, below every layer that raises it)."""

from mtssl.utils.errors import ConfigError

__all__ = ["ConfigError"]
