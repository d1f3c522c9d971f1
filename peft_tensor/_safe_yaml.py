"""YAML read from files anyone may have written (bundle configs, model cards, recipe configs): one bounded loader.

``yaml.SafeLoader`` builds plain values only (no ``!!python/...`` tags), but it neither limits aliases nor size: a few
hundred bytes of nested aliases ("billion laughs") expand to gigabytes in whatever later walks the document. The
loader here counts alias and other nodes while composing and stops past :data:`MAX_YAML_ALIASES` /
:data:`MAX_YAML_NODES` with :class:`YamlLimitError`.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["MAX_YAML_ALIASES", "MAX_YAML_NODES", "YamlLimitError", "load_yaml", "yaml_problem"]

MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 20_000  # model-zoo train.yaml: ~2,000


class YamlLimitError(Exception):
    """The document exceeds the loader's limits (internal: callers turn it into their own typed error)."""


class _BoundedYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts alias and other nodes while composing and stops past the limits: aliases
    are what a "billion laughs" document is made of, and whatever later walks the document pays for each alias
    with the whole aliased subtree."""

    max_aliases = MAX_YAML_ALIASES
    max_nodes = MAX_YAML_NODES

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > self.max_aliases:
                raise YamlLimitError(f"it uses more than {self.max_aliases} YAML aliases (*name); refused, as a "
                                     "document built from aliases can expand to billions of values")
        else:
            self._nodes += 1
            if self._nodes > self.max_nodes:
                raise YamlLimitError(f"it holds more than {self.max_nodes} YAML nodes; too large")
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` with the alias and node limits. Raises :class:`YamlLimitError` past them,
    ``yaml.YAMLError`` on invalid YAML (see :func:`yaml_problem` for a message that does not quote the file)."""
    return yaml.load(text, Loader=_BoundedYamlLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error without the quoted source line (which may be anything the file holds)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or type(exc).__name__
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML ({problem}{where})"
