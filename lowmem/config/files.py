"""YAML files with `include:` and dotted command-line overrides, merged into one plain tree (unvalidated)."""
from __future__ import annotations

import typing
from pathlib import Path

import yaml

from lowmem.config.schema import deep_merge
from lowmem.errors import ConfigError


def _yaml_problem(err: yaml.YAMLError, where: bool = True) -> str:
    """A YAML error on one line: what is wrong and (`where`) the line and column of the file."""
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if where and mark else problem


def not_a_file(path: Path) -> str:
    """Why `path` cannot be read as a file, for a message."""
    return "is a directory, not a file" if path.is_dir() else "not found"


def _resolve_include(name: str, relative_to: Path) -> Path:
    candidate = relative_to / name
    if not candidate.is_file():
        raise ConfigError(f"include: file '{name}' {not_a_file(candidate)} (relative to {relative_to})")
    return candidate


def read_yaml_tree(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML file and the files its `include:` names (earlier includes first, this file last)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' {not_a_file(path)}")
    if path.resolve() in _seen:
        raise ConfigError(f"include cycle through '{path}'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML ({_yaml_problem(err)})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file '{path}' cannot be read: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at top level")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for name in includes:
        merged = deep_merge(merged, read_yaml_tree(_resolve_include(name, path.parent), _seen + (path.resolve(),)))
    return deep_merge(merged, data)


def apply_override(tree: dict, override: str) -> dict:
    """Apply one `dotted.key=value` override; the value is parsed as YAML (numbers, lists, null...)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like dotted.key=value")
    dotted, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{override}': the value of {dotted.strip()} is not valid YAML "
                          f"({_yaml_problem(err, where=False)})") from None
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value
    return tree


def load_tree(paths: str | Path | typing.Sequence[str | Path] | None, overrides: typing.Sequence[str] = ()) -> dict:
    """Read and merge one or more YAML files (later wins) and apply dotted overrides, unvalidated."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    tree: dict = {}
    for path in paths:
        tree = deep_merge(tree, read_yaml_tree(path))
    for override in overrides:
        tree = apply_override(tree, override)
    return tree
