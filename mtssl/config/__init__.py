"""The job config: its schema, composition, validation and identity.

Where a value comes from
------------------------
Hydra composes the job config from ``mtssl/conf/``; a value comes from the first of these that sets it:

    1. the command line: ``key=value`` (in a sweep: the job's axis values, then the sweep's job keys and
       ``job_overrides``, then the ablation's ``fixed`` ones, all given to the job as its command line)
    2. the regime's part for the backbone family   regime_family/<regime>_<family>.yaml  (cpu_resnet)
    3. the regime's part for the method            regime_method/<regime>_<method>.yaml  (cpu_mocov3)
    4. the regime                                  regime/<regime>.yaml, after the regime it inherits from
    5. the backbone preset                         backbone/<name>.yaml                  (vit_tiny)
    6. the backbone family                         backbone_family/<family>.yaml         (vit: AdamW)
    7. the data, views and predictor presets       data/, views/, predictor/  (only data.*, views.*, predictor.*)
    8. the method                                  method/<name>.yaml  (method.*, its optim.*)
    9. the defaults                                config.yaml

The order of ``config.yaml``'s defaults list is this rule (a later entry replaces what an earlier one set)
and nothing else merges values: no field is "null = inherit" and no Python code fills a recipe value in.
A regime's parts are found by name (``${regime}_${method}``, ``${regime}_<family>``); a regime that
inherits another one (``defaults: [cpu]``) names its parent's parts in its own (``cpu_quick_byol.yaml:
defaults: [cpu_byol]``). ``python -m mtssl.run ... --show-recipe`` prints the recipe a job will train with
and ``--cfg job`` its whole effective config.

Modules
-------
    compose.py   composition (Hydra) and resolution: the effective config a job runs with
    identity.py  the training fields, the run's hash, the fields two configs differ in
    errors.py    ConfigError
    renames.py   renamed fields, refused naming their replacement
    quoting.py   override values Hydra cannot read unquoted, shown quoted
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
