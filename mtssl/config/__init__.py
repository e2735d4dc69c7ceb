"""The job config: its schema, composition, validation and identity.

    compose.py   composition (Hydra) and resolution: the effective config a job runs with
    identity.py  the training fields, the run's hash, the fields two configs differ in
    errors.py    ConfigError
    schema.py    the field checks (FIELD_CHECKS): each field's type, range or choices, checked once
    validate.py  validate_config: what spans fields, the output directory, the data folder

This package exports the names of compose, identity and errors. The schema and the validation read the
registries of every layer (optimisers in mtssl.train.optim, feature dtypes in mtssl.eval.features, ...), so
they sit above them: import them from their modules (``from mtssl.config.validate import validate_config``).
"""

from mtssl.config.compose import (CONFIG_MODULE, REPO_ROOT, available, compose_config, default_precision,
                                  describe_recipe, resolve_config)
from mtssl.config.errors import ConfigError
from mtssl.config.identity import (ABSENT, NON_TRAINING_FIELDS, PRESET_KEYS, changes_from_file, config_changes,
                                   config_hash, describe_changes, format_changes, training_fields)

__all__ = [
    "ABSENT", "CONFIG_MODULE", "NON_TRAINING_FIELDS", "PRESET_KEYS", "REPO_ROOT", "ConfigError", "available",
    "changes_from_file", "compose_config", "config_changes", "config_hash", "default_precision", "describe_changes",
    "describe_recipe", "format_changes", "resolve_config", "training_fields",
]
