"""Reading the values of job files and `key=value` overrides, before OmegaConf merges them.

- YAML 1.2 booleans: PyYAML reads YAML 1.1, where `on`, `off`, `yes`, `no`, `y` and `n` are
  booleans, so `tracking.comet: off` arrived as False and failed its string check. Job files and
  override values are read with a loader whose only booleans are true and false (either case); the
  other words stay strings, and OmegaConf still converts them for a field typed bool.
- Resolvers are refused: `${oc.env:COMET_API_KEY}` would resolve into the resolved config, which is
  written to job.json and may name output folders. A job file or override never reads the
  environment; the components that need a secret read it themselves and never record it.
- A field typed as a variable-length tuple (`denoise: tuple[float, ...]`) given one scalar holds that
  one value, so `denoise=0.5` means "0.5 for every phase" rather than a type error.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable
from typing import Any

import yaml


class JobValueError(ValueError):
    """A value that cannot be read; the message names the key or the override."""


class JobYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's booleans: only true / True / TRUE / false / False / FALSE."""


JobYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
JobYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=JobYamlLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise JobValueError(str(err)) from None


# "${name:" opens a resolver call (oc.env, oc.decode, ...); "${a.b}" is a plain node reference.
_RESOLVER = re.compile(r"(?<!\\)\$\{\s*[A-Za-z_][\w.]*\s*:")


def refuse_resolvers(data: Any, where: str = "") -> None:
    """Raise JobValueError naming the key of the first string that calls a resolver."""
    if isinstance(data, dict):
        for k, v in data.items():
            refuse_resolvers(v, f"{where}.{k}" if where else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            refuse_resolvers(v, f"{where}[{i}]")
    elif isinstance(data, str) and _RESOLVER.search(data):
        raise JobValueError(
            f"{where}: {data!r} calls a resolver; job files and overrides may not read the environment "
            "or call resolvers (${oc.env:...} would write the value into job.json). Write the value "
            "itself; secrets such as COMET_API_KEY are read from the environment by the component that "
            "needs them and never recorded"
        )


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """`a.b=value` strings as one nested mapping (later overrides win). Values are YAML 1.2; keys
    under `sweep.` keep their dots (`sweep.tiling.method=[a,b]` sweeps the key "tiling.method")."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise JobValueError(f"override {item!r} must look like key=value")
        try:
            value = "" if text == "" else read_yaml(text)
        except JobValueError as err:
            raise JobValueError(
                f'override {item!r}: the value is not valid YAML (quote it, e.g. {key}="..."): '
                f"{str(err).splitlines()[0]}"
            ) from None
        refuse_resolvers(value, key)
        parts = key.split(".")
        if parts[0] == "sweep" and len(parts) > 1:
            parts = ["sweep", ".".join(parts[1:])]
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def wrap_scalars(schema: type, data: dict[str, Any]) -> dict[str, Any]:
    """`data` with each scalar given to a variable-length tuple field of `schema` (a dataclass, or
    a nested one) wrapped in a one-element list."""
    if not dataclasses.is_dataclass(schema) or not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(schema)
    out = dict(data)
    for name, value in data.items():
        hint = _without_none(hints.get(name))
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            out[name] = wrap_scalars(hint, value)
        elif _is_var_tuple(hint) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            out[name] = [value]
    return out


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _is_var_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple and typing.get_args(hint)[-1:] == (Ellipsis,)
