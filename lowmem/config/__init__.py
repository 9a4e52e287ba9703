"""The config schema (a leaf layer): dataclass walking with type checks, registries of named classes, YAML files
with includes and overrides. The sections live with their owners (lowmem.model.config, lowmem.data.config,
lowmem.optim options, lowmem.distributed.config, lowmem.train.config), and lowmem.train.config composes them
into the run's Config."""
from lowmem.config.files import apply_override, load_tree, not_a_file, read_yaml_tree
from lowmem.config.schema import Registry, check_choice, deep_merge, flatten, from_dict, require, to_dict

__all__ = ["Registry", "apply_override", "check_choice", "deep_merge", "flatten", "from_dict", "load_tree",
           "not_a_file", "read_yaml_tree", "require", "to_dict"]
