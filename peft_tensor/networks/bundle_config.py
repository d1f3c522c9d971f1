"""``network_def`` out of an untrusted MONAI bundle config, with bounded work: :func:`read_network_def`.

MONAI's ``ConfigParser`` reads, macro-expands and reference-resolves the *whole* config, without limits: a few
hundred bytes of YAML aliases or ``@`` references expand to gigabytes, ``%`` macros read any JSON/YAML file on the
machine (absolute or working-directory-relative paths), and deep nesting ends in ``RecursionError``. So a bundle
that was downloaded is read here instead:

- the config file with ``json.loads`` or a YAML ``SafeLoader`` that refuses more than :data:`MAX_YAML_ALIASES`
  aliases and :data:`MAX_YAML_NODES` nodes, files over :data:`MAX_CONFIG_BYTES` refused;
- only ``network_def`` and what it refers to is resolved: ``@id``, ``@id::key::0`` / ``@id#key#0`` (MONAI's
  ``ID_SEP_KEY`` and its older ``#``), relative ``@::key`` / ``@#key``, ``$@id`` (an expression that is only a
  reference), and ``%`` macros (``%id``, ``%configs/x.yaml::key``) -- files only inside the bundle folder (after
  ``os.path.realpath``: a symlink out of it is refused);
- resolution is memoised per id and bounded: :data:`MAX_DEPTH` levels of containers and references,
  :data:`MAX_EXPANSIONS` references followed, :data:`MAX_EXPANDED_NODES` values produced;
- Python expressions (``$...``) and nested components (a ``_target_`` below ``network_def``) are refused: building
  them runs code from the file.

Every failure is a :class:`~peft_tensor.networks.load.NetworkLoadError` that names the config file and the
reference; the content of a file outside the bundle is never read, so it never appears in a message or report.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from .._safe_yaml import MAX_YAML_ALIASES, MAX_YAML_NODES, YamlLimitError, load_yaml
from .._safe_yaml import yaml_problem as _yaml_problem
from .load import NetworkLoadError

__all__ = ["read_bundle_config_file", "read_network_def", "BundleConfig", "MAX_CONFIG_BYTES", "MAX_YAML_ALIASES",
           "MAX_YAML_NODES", "MAX_DEPTH", "MAX_EXPANSIONS", "MAX_EXPANDED_NODES"]

MAX_CONFIG_BYTES = 1 << 20  # model-zoo configs are a few KB
MAX_DEPTH = 32  # nested containers + references followed, from network_def down
MAX_EXPANSIONS = 10_000  # references / macros followed (memoised repeats included)
MAX_EXPANDED_NODES = 100_000  # values in network_def once every reference is expanded
MAX_MACRO_FILES = 16

ID_SEP = "::"  # monai.bundle.utils.ID_SEP_KEY; "#" is MONAI's older separator, normalised to it
_ID = re.compile(r"\w*(?:::\w*)*")  # MONAI's id_matcher without the "@"
_RELATIVE = re.compile(r"^((?:::)+)")  # "@::" / "@::::" (after normalising '#'): same level / one level up
_FILE_ID = re.compile(r"(.*\.(?:json|yaml|yml))(?=(?:::.*)|$)", re.IGNORECASE)  # MONAI's split_path_id
_ONLY_REF = re.compile(r"\$@[\w.#:]+")  # "$@id": an expression that is only a reference
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


class _Refused(Exception):
    """A limit of the YAML loader (turned into a NetworkLoadError naming the file)."""


def read_bundle_config_file(path: str | os.PathLike, label: str | None = None, suffix: str | None = None) -> Any:
    """The content of a JSON / YAML bundle config file, read with the limits above (``label``: how messages name
    the file, default its path; ``suffix``: its format, default the path's, e.g. for a Hub blob without one)."""
    path = Path(path)
    label = label or str(path)
    head = f"{label} cannot be read as a MONAI bundle config"
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise NetworkLoadError(f"{head}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise NetworkLoadError(f"{head}: it is larger than {MAX_CONFIG_BYTES} bytes, too large for a bundle "
                               "config") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise NetworkLoadError(f"{head}: it is not UTF-8 text") from None
    suffix = (suffix or path.suffix).lower()
    try:
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml"):
            return load_yaml(text)
    except (_Refused, YamlLimitError) as exc:
        raise NetworkLoadError(f"{head}: {exc}") from None
    except RecursionError:
        raise NetworkLoadError(f"{head}: it is nested too deep") from None
    except json.JSONDecodeError as exc:
        raise NetworkLoadError(f"{head}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except yaml.YAMLError as exc:
        raise NetworkLoadError(f"{head}: {_yaml_problem(exc)}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. an integer past Python's digit limit
        raise NetworkLoadError(f"{head}: {type(exc).__name__}") from None
    raise NetworkLoadError(f"{head}: only .json, .yaml and .yml configs are read")


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _copy(value: Any) -> Any:
    """A fresh copy of a resolved value (JSON-like: dicts, lists, scalars), so repeats are not shared objects."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _allowed_roots(root: Path) -> list[Path]:
    """Where the files of the bundle at ``root`` may really live: the folder itself and, for a Hugging Face Hub
    snapshot (``.../snapshots/<revision>``, its files symlinks into the repo's ``blobs``), that ``blobs`` folder."""
    real = Path(os.path.realpath(root))
    roots = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        roots.append(Path(os.path.realpath(real.parent.parent / "blobs")))
    return roots


class BundleConfig:
    """One bundle config file, its ids resolved on demand (see the module docstring for the syntax and limits)."""

    def __init__(self, path: str | os.PathLike, bundle_root: str | os.PathLike):
        self.path = Path(path)
        self.root = Path(bundle_root)
        self.config = read_bundle_config_file(self.path)
        if not isinstance(self.config, Mapping):
            raise NetworkLoadError(f"{self.path} holds a {type(self.config).__name__}, not a MONAI bundle config "
                                   "(a mapping of ids to values)")
        self._files: dict[str, Any] = {}  # real path -> content of a macro file
        self._memo: dict[tuple[str | None, str], tuple[Any, int]] = {}  # (file, id) -> (resolved value, its size)
        self._active: list[tuple[str | None, str]] = []  # being resolved: a repeat is a circular reference
        self._expansions = 0
        self._nodes = 0

    def __contains__(self, key: str) -> bool:
        return key in self.config

    # ---------------------------------------------------------------------------------------------- entry point
    def resolve(self, key: str) -> Any:
        """The value of top-level ``key`` with every reference and macro in it expanded (a ``_target_`` allowed
        at its top only)."""
        if key not in self.config:
            raise NetworkLoadError(f"{self.path} has no {key!r}")
        try:
            return self._value(self.config[key], (key,), 0, top=True)
        except RecursionError:
            raise self._error(f"{key} is nested too deep") from None

    def _error(self, message: str) -> NetworkLoadError:
        return NetworkLoadError(f"{self.path}: network_def {message}")

    # ---------------------------------------------------------------------------------------------- values
    def _value(self, node: Any, here: tuple[str, ...], depth: int, top: bool = False) -> Any:
        if depth > MAX_DEPTH:
            raise self._error(f"is nested too deep: more than {MAX_DEPTH} levels of containers and references "
                              f"(at {ID_SEP.join(here)})")
        self._grow(1)
        if isinstance(node, str):
            return self._string(node, here, depth, top)
        if isinstance(node, Mapping):
            if "_target_" in node and not top:
                raise self._error(f"builds a nested component ({_short(node['_target_'])}); only plain "
                                  "constructor arguments are read. Build the network yourself and pass network=.")
            return {k: self._value(v, here + (str(k),), depth + 1) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [self._value(v, here + (str(i),), depth + 1) for i, v in enumerate(node)]
        return node

    def _grow(self, size: int) -> None:
        self._nodes += size
        if self._nodes > MAX_EXPANDED_NODES:
            raise self._error(f"is too large once its references are expanded: more than {MAX_EXPANDED_NODES} "
                              "values (references to references multiply); refused")

    def _string(self, text: str, here: tuple[str, ...], depth: int, top: bool) -> Any:
        value = text[1:] if _ONLY_REF.fullmatch(text) else text
        if value.startswith("$"):
            raise NetworkLoadError(
                f"{self.path}: network_def uses the Python expression {_short(value)}; peft_tensor does not evaluate "
                "code from config files. Pass the value as an override (load_network(..., name=value)), or build "
                "the network yourself (monai.bundle.ConfigParser) and pass network=.")
        if value.startswith("@"):
            ref = self._absolute(value, here)
            if not _ID.fullmatch(ref):
                raise self._error(f"refers to {_short(text)}, which is not a MONAI reference (@id, ids of letters, "
                                  "digits and _ joined by :: or #)")
            return self._follow(None, ref, text, depth, top)
        if value.startswith("%"):
            return self._macro(value, text, here, depth, top)
        return value

    def _absolute(self, value: str, here: tuple[str, ...]) -> str:
        """The absolute id of a reference or macro (without its ``@`` / ``%``): ``#`` -> ``::``, relative ids
        (``@::x`` same level, ``@::::x`` one up, as MONAI's ``resolve_relative_ids``) made absolute."""
        body = value[1:].replace("#", ID_SEP)
        found = _RELATIVE.match(body)
        if not found:
            return body
        up = len(found.group(1)) // len(ID_SEP)
        if up > len(here):
            raise self._error(f"uses the relative reference {_short(value)}, which reaches above the config's top "
                              f"level (from {ID_SEP.join(here)})")
        parent = here[:-up]
        return ID_SEP.join(parent) + (ID_SEP if parent else "") + body[len(found.group(1)):]

    # ---------------------------------------------------------------------------------------------- references
    def _follow(self, file: str | None, ref: str, text: str, depth: int, top: bool) -> Any:
        """The resolved value of id ``ref`` in the config (``file`` None) or in a macro file; memoised."""
        self._expansions += 1
        if self._expansions > MAX_EXPANSIONS:
            raise self._error(f"follows more than {MAX_EXPANSIONS} references (at {_short(text)}); refused")
        key = (file, ref)
        if key in self._memo and not top:
            value, size = self._memo[key]
            self._grow(size)
            return _copy(value)
        if key in self._active:
            raise NetworkLoadError(f"{self.path}: circular reference {text}")
        node, path = self._lookup(file, ref, text, depth)
        self._active.append(key)
        start = self._nodes
        try:
            value = self._value(node, path, depth + 1, top)
        finally:
            self._active.pop()
        if not top:
            self._memo[key] = (value, self._nodes - start)
        return value

    def _lookup(self, file: str | None, ref: str, text: str, depth: int) -> tuple[Any, tuple[str, ...]]:
        """The raw node at id ``ref`` and its path; macro strings on the way are expanded (MONAI expands every
        macro before it resolves references), references are not."""
        node: Any = self.config if file is None else self._files[file]
        if ref == "":
            return node, ()
        path: list[str] = []
        for key in ref.split(ID_SEP):
            node = self._raw_macro(node, tuple(path), text, depth)
            at = ID_SEP.join(path) or "the config"
            if isinstance(node, Mapping):
                if key not in node:
                    if not path:
                        raise self._error(f"refers to {text}, which the config does not define.")
                    raise self._error(f"refers to {text}, but {at} has no key {key!r}")
                node = node[key]
            elif isinstance(node, (list, tuple)):
                if not key.isdigit():
                    raise self._error(f"refers to {text}, but {at} is a list and {key!r} is not an index into it")
                if int(key) >= len(node):
                    raise self._error(f"refers to {text}, but index {key} is past the end of {at} (a list of "
                                      f"{len(node)})")
                node = node[int(key)]
            else:
                raise self._error(f"refers to {text}, but {at} is a scalar ({type(node).__name__}), not a dict or "
                                  f"list, so it has no {key!r}")
            path.append(key)
        return node, tuple(path)

    def _raw_macro(self, node: Any, here: tuple[str, ...], text: str, depth: int) -> Any:
        """``node``, or the raw content a macro string there stands for (for looking further into it)."""
        hops = 0
        while isinstance(node, str) and node.startswith("%"):
            hops += 1
            self._expansions += 1
            if depth + hops > MAX_DEPTH or self._expansions > MAX_EXPANSIONS:
                raise self._error(f"is nested too deep: macros expand into macros (at {_short(text)})")
            file, ref = self._macro_target(node, text, here)
            node, here = self._lookup(file, ref, text, depth + hops)
        return node

    # ---------------------------------------------------------------------------------------------- macros
    def _macro(self, value: str, text: str, here: tuple[str, ...], depth: int, top: bool) -> Any:
        file, ref = self._macro_target(value, text, here)
        return self._follow(file, ref, text, depth, top)

    def _macro_target(self, value: str, text: str, here: tuple[str, ...]) -> tuple[str | None, str]:
        """(file key or None for this config, id) of a ``%`` macro; the file checked to be inside the bundle and
        read (once)."""
        body = self._absolute(value, here)
        found = _FILE_ID.findall(body)
        if not found:
            return None, body
        name = found[0]
        ref = body.rsplit(name, 1)[1]
        ref = ref[len(ID_SEP):] if ref.startswith(ID_SEP) else ref
        return self._macro_file(name, text), ref

    def _macro_file(self, name: str, text: str) -> str:
        root_abs = Path(os.path.normpath(os.path.abspath(self.root)))
        roots = _allowed_roots(self.root)
        given = Path(name)
        candidate = given if given.is_absolute() else root_abs / given  # relative to the bundle, never the CWD
        lexical = Path(os.path.normpath(os.path.abspath(candidate)))
        real = Path(os.path.realpath(candidate))
        inside = lexical.is_relative_to(root_abs) or lexical.is_relative_to(roots[0])
        if not inside or not any(real.is_relative_to(r) for r in roots):
            raise self._error(f"uses the macro {_short(text)}, which reads {name}: outside the bundle folder "
                              f"{self.root}. Only files inside the bundle are read; nothing was read from it.")
        key = str(real)
        if key in self._files:
            return key
        if not real.is_file():
            raise self._error(f"uses the macro {_short(text)}, but the bundle has no file {name}")
        if len(self._files) >= MAX_MACRO_FILES:
            raise self._error(f"uses macros from more than {MAX_MACRO_FILES} files; refused")
        label = f"{self.path}: the macro file {name}"
        self._files[key] = read_bundle_config_file(real, label=label, suffix=Path(name).suffix)
        return key


def read_network_def(config: str | os.PathLike, bundle_root: str | os.PathLike) -> dict:
    """``network_def`` of the bundle config ``config`` (in the bundle folder ``bundle_root``), references and
    macros expanded: ``{"_target_": ..., **constructor arguments}``."""
    parsed = BundleConfig(config, bundle_root)
    if "network_def" not in parsed:
        raise NetworkLoadError(f"{config} has no 'network_def': pass network=<module or class path>.")
    netdef = parsed.resolve("network_def")
    if not isinstance(netdef, Mapping) or "_target_" not in netdef:
        raise NetworkLoadError(f"{config}: network_def is {_short(netdef)}, not a component "
                               "({'_target_': class path, **constructor arguments}); pass network=.")
    return dict(netdef)
