"""The YAML a job file is read with: PyYAML's safe loader with YAML 1.2's scalars, and no duplicate keys."""
from __future__ import annotations

import re

import yaml

_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"


class JobLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `off`, `no` and `yes` are booleans and `1e-3` is a string: `amp: off` came out
    False and `lr: 1e-3` a string, both refused. YAML 1.2 (what the README's examples assume) reads them as the
    string "off" and the number 0.001. And where a key appears twice, PyYAML keeps the last one silently: a
    second `search:` block replaced the first, bounds and all. Here it is an error naming the key and lines."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key; the base class says so
                    continue
                if first != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (lines {first} and {key_node.start_mark.line + 1})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# The resolvers are copied before changing them: SafeLoader's own stay as they are for everyone else.
JobLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_BOOL, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
JobLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
JobLoader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
      [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    | [-+]?\.(?:inf|Inf|INF)
    | \.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def read_yaml(text: str):
    return yaml.load(text, Loader=JobLoader)
