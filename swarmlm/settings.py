"""Settings: config dataclass fields, declared once, as command-line flags, env vars and config file keys.

A field becomes a setting through its metadata; its help, and optionally its flag name, env var, choices and
parser, are declared there and nowhere else:

    request_timeout: float = field(default=60.0, metadata=setting("seconds one step may take"))

gives the flag --request-timeout, the env var SWARMLM_REQUEST_TIMEOUT and the config file key
request_timeout (request-timeout is accepted too). `setting(flag="save")` renames the flag (--save), the
env var (SWARMLM_SAVE) and adds a key (save; the field name stays valid in files). The type comes from the
annotation:
  int, float, str          one word (`parse=` replaces the conversion, `choices=` limits the values)
  bool                     --x / --no-x; env and files: 1/true/yes/on or 0/false/no/off
  list[str], tuple[str, ...]  any number of words (env: separated by spaces or commas)
  tuple[int, int]          A:B (files: "A:B" or [A, B])
  Optional[X]              X, with None as the default
Fields without `setting` metadata (nested configs, library-only knobs) are not settings.

A command takes the settings of some dataclasses (`Flags`: all or some fields of one dataclass) and
`Settings` resolves each one from the first of, highest precedence first:
  1. the command line, 2. the environment (an empty variable counts as unset), 3. the config file
  (`read_config`; keys at the top level or in the group's table, e.g. [training]), 4. the command's default
  (`Flags(defaults=...)`), 5. the dataclass default. A setting with none of these is an error.
A setting declared with `excludes=` (blocks vs num_blocks) drops the excluded settings that come from a
lower layer, so a flag overrides the other one of the pair given in the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

ENV_PREFIX = "SWARMLM_"  # a dataclass may name its own (an ENV_PREFIX class attribute), e.g. SWARMLM_TRAINING_
RESERVED_ENV = frozenset({"SWARMLM_HOME"})  # variables swarmlm reads that are no setting
_METADATA_KEY = "swarmlm.setting"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_MISSING = dataclasses.MISSING
_METAVARS: dict[Any, str] = {int: "N", float: "NUM"}


@dataclass(frozen=True)
class Setting:
    """What a field declares about itself as a setting (see `setting`)."""

    help: str
    flag: Optional[str] = None  # the name without dashes, e.g. "save" (default: the field name)
    env: Optional[str] = None  # the full variable name (default: SWARMLM_ + the flag name)
    choices: Optional[tuple] = None
    parse: Optional[Callable[[str], Any]] = None  # one word of text -> the value
    metavar: Optional[str] = None
    excludes: tuple[str, ...] = ()  # settings of the same dataclass that this one replaces when given


def setting(help: str, *, flag: Optional[str] = None, env: Optional[str] = None, choices: Optional[Iterable] = None,
            parse: Optional[Callable[[str], Any]] = None, metavar: Optional[str] = None,
            excludes: Sequence[str] = ()) -> dict:
    """Field metadata that makes a dataclass field a setting: `field(default=..., metadata=setting("help"))`."""
    return {_METADATA_KEY: Setting(help, flag, env, tuple(choices) if choices is not None else None, parse, metavar,
                                   tuple(excludes))}


def parse_pair(text: str) -> tuple[int, int]:
    """"A:B" -> (A, B) (both integers)."""
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like A:B (e.g. 0:4), got {text!r}") from None
    return start, end


def parse_bool(text: str) -> bool:
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, got {text!r}")


@dataclass(frozen=True)
class Option:
    """One setting of one dataclass: its names, how text becomes its value, and its default."""

    owner: type
    name: str  # the field name: the argparse dest and the canonical config file key
    flag: str  # e.g. "--request-timeout"
    env: str
    kind: str  # "bool", "word" (one word of text), "words" (a list or tuple of str)
    parse: Callable[[str], Any]
    container: Optional[type]  # list or tuple, for "words"
    declared: Setting
    field: dataclasses.Field

    @property
    def keys(self) -> set[str]:
        """Config file keys naming this setting (dashes read as underscores)."""
        return {self.name, self.flag[2:].replace("-", "_")}

    @property
    def required(self) -> bool:
        return self.field.default is _MISSING and self.field.default_factory is _MISSING

    def default(self) -> Any:
        if self.field.default_factory is not _MISSING:
            return self.field.default_factory()
        return self.field.default

    def from_text(self, text: str, where: str) -> Any:
        """An env var's text -> the value (ValueError naming `where`)."""
        try:
            if self.kind == "bool":
                return parse_bool(text)
            if self.kind == "words":
                return self.container(word for word in re.split(r"[\s,]+", text.strip()) if word)
            return self._checked(self.parse(text.strip()))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"{where}: {self.name} {e}") from None

    def from_file(self, value: Any, where: str) -> Any:
        """A TOML value -> the value (strings are read like env vars; ValueError naming `where`)."""
        if isinstance(value, str):
            return self.from_text(value, where)
        integer = isinstance(value, int) and not isinstance(value, bool)
        if self.kind == "bool" and isinstance(value, bool):
            return value
        if self.kind == "words" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return self.container(value)
        if self.parse is parse_pair and isinstance(value, list) and len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        if (self.parse is int and integer) or (self.parse is float and (integer or isinstance(value, float))):
            try:
                return self._checked(self.parse(value))
            except ValueError as e:
                raise ValueError(f"{where}: {self.name} {e}") from None
        raise ValueError(f"{where}: {self.name} cannot be {value!r} ({type(value).__name__})")

    def _checked(self, value: Any) -> Any:
        if self.declared.choices is not None and value not in self.declared.choices:
            raise ValueError(f"must be one of {', '.join(map(str, self.declared.choices))}, got {value!r}")
        return value


def _options(cls: type) -> list[Option]:
    hints = get_type_hints(cls)
    options = []
    for f in dataclasses.fields(cls):
        declared = f.metadata.get(_METADATA_KEY)
        if declared is None:
            continue
        flag = declared.flag or f.name
        kind, parse, container = _kind(hints[f.name], f"{cls.__name__}.{f.name}")
        env = declared.env or getattr(cls, "ENV_PREFIX", ENV_PREFIX) + flag.replace("-", "_").upper()
        if env in RESERVED_ENV:
            raise TypeError(f"{cls.__name__}.{f.name}: {env} is reserved (not a setting)")
        options.append(Option(cls, f.name, "--" + flag.replace("_", "-"), env, kind, declared.parse or parse,
                              container, declared, f))
    return options


def _kind(hint: Any, where: str) -> tuple[str, Callable[[str], Any], Optional[type]]:
    if get_origin(hint) in (Union, types.UnionType):  # Optional[X]: X, None only as the default
        rest = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(rest) == 1:
            hint = rest[0]
    origin, args = get_origin(hint), get_args(hint)
    if hint is bool:
        return "bool", parse_bool, None
    if hint in (int, float, str):
        return "word", hint, None
    if origin in (list, tuple) and args in ((str,), (str, ...)):
        return "words", str, origin
    if origin is tuple and args == (int, int):
        return "word", parse_pair, None
    raise TypeError(f"{where}: no setting type for {hint!r}")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}:{value[1]}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


class Flags:
    """The settings of one dataclass that a command takes: all, `only` some, or all but `exclude`.

    `section`: the config file table that may hold them (they may also stand at the top level); `title`: their
    heading in --help; `defaults`: this command's defaults, replacing the dataclass's."""

    def __init__(self, cls: type, *, only: Optional[Sequence[str]] = None, exclude: Sequence[str] = (),
                 section: Optional[str] = None, title: Optional[str] = None, defaults: Optional[Mapping] = None):
        options = {option.name: option for option in _options(cls)}
        for name in [*(only or ()), *exclude, *(defaults or {})]:
            if name not in options:
                raise ValueError(f"{cls.__name__} has no setting {name!r}")
        self.cls, self.section, self.title, self.defaults = cls, section, title, dict(defaults or {})
        self.options = [option for name, option in options.items()
                        if (only is None or name in only) and name not in exclude]

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Adds one flag per setting; a flag not given leaves no attribute on the parsed namespace."""
        target: Any = parser
        if self.title:  # one heading per title, however many groups share it
            headings = parser.__dict__.setdefault("swarmlm_headings", {})
            if self.title not in headings:
                headings[self.title] = parser.add_argument_group(self.title)
            target = headings[self.title]
        for option in self.options:
            kwargs: dict[str, Any] = dict(dest=option.name, default=argparse.SUPPRESS, help=self.help(option))
            if option.kind == "bool":
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                metavar = option.declared.metavar or _METAVARS.get(option.parse)
                kwargs.update(type=option.parse, choices=option.declared.choices, metavar=metavar)
                if option.kind == "words":
                    kwargs["nargs"] = "*"
            target.add_argument(option.flag, **kwargs)

    def default(self, option: Option) -> Any:
        return self.defaults[option.name] if option.name in self.defaults else option.default()

    def help(self, option: Option) -> str:
        """The declared help, the default (unless None or empty) and the env var."""
        if option.required and option.name not in self.defaults:
            shown = "required; "
        else:
            default = self.default(option)  # None or empty: the help says what that means
            shown = "" if default is None or default in ((), []) else f"default: {_shown(default)}; "
        return f"{option.declared.help} ({shown}env {option.env})".replace("%", "%%")


def read_config(path: str, groups: Sequence[Flags]) -> dict[str, Any]:
    """A TOML file -> {field name: value} for the settings of `groups`. Keys are field or flag names (dashes or
    underscores), at the top level or in a group's table; an unknown key or table is a ValueError listing the
    valid ones."""
    where = f"config file {path}"
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as e:
        raise ValueError(f"{where}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: {e}") from None
    options = [(option, group.section) for group in groups for option in group.options]
    sections = sorted({group.section for group in groups if group.section})
    values: dict[str, Any] = {}

    def take(table: dict, section: Optional[str]) -> None:
        valid = {key: option for option, owner in options if section in (None, owner) for key in option.keys}
        for key, value in table.items():
            if section is None and key in sections and isinstance(value, dict):
                take(value, key)
                continue
            option = valid.get(key.replace("-", "_"))
            if option is None:
                place = f"in [{section}]" if section else "at the top level"
                tables = f"; tables: {', '.join(f'[{s}]' for s in sections)}" if sections and not section else ""
                raise ValueError(f"{where}: unknown key {key!r} {place}; valid keys: "
                                 f"{', '.join(sorted({o.name for o in valid.values()}))}{tables}")
            if option.name in values:
                raise ValueError(f"{where}: {option.name} is given twice")
            values[option.name] = option.from_file(value, f"{where}: key {key!r}")

    take(data, None)
    return values


class Settings:
    """The resolved settings of one parsed command (see the module docstring for the precedence).

    `settings["name"]` is one value; `settings.of(cls)` the values of cls's settings, as keyword arguments."""

    def __init__(self, args: argparse.Namespace, groups: Sequence[Flags], *, config: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None):
        env = os.environ if env is None else env
        file = read_config(config, groups) if config else {}
        self.values: dict[str, Any] = {}
        self.owners: dict[str, type] = {}
        layers: dict[str, int] = {}
        for group in groups:
            for option in group.options:
                if option.name in self.owners:  # one dest, one config file key: a command takes one of each name
                    raise TypeError(f"{option.owner.__name__} and {self.owners[option.name].__name__} both give "
                                    f"the setting {option.name}")
                self.owners[option.name] = option.owner
                if hasattr(args, option.name):
                    value, layer = getattr(args, option.name), 3
                    if option.kind == "words":
                        value = option.container(value)
                elif env.get(option.env):
                    value, layer = option.from_text(env[option.env], f"${option.env}"), 2
                elif option.name in file:
                    value, layer = file[option.name], 1
                elif option.name in group.defaults or not option.required:
                    value, layer = group.default(option), 0
                else:
                    raise ValueError(f"missing setting {option.name}: give {option.flag}, ${option.env} or "
                                     f"{option.name} in the --config file")
                self.values[option.name], layers[option.name] = value, layer
        for group in groups:  # a setting given in a higher layer drops the ones it excludes from lower layers
            for option in group.options:
                for other in option.declared.excludes:
                    mine, theirs = layers[option.name], layers.get(other, 0)
                    if mine and theirs and mine != theirs:
                        lower = other if theirs < mine else option.name
                        self.values[lower] = _default_of(groups, lower)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def of(self, cls: type) -> dict[str, Any]:
        return {name: value for name, value in self.values.items() if self.owners[name] is cls}


def _default_of(groups: Sequence[Flags], name: str) -> Any:
    return next(group.default(option) for group in groups for option in group.options if option.name == name)
