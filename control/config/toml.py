"""TOML text to config dataclasses and back.

The TOML layer checks a document's shape (unknown and missing keys, tables vs
arrays) and turns address and prefix strings into `ipaddress` objects; the
values themselves are checked by control/config/validate.py, once for a file
and for a config built in Python. `from_table` and `from_array` also read the
control center's config (control/center/config.py)."""

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from control.config.schema import (AgentConfig, CenterLinkConfig, Config, ConfigError, GatewayConfig, HealthConfig,
                                   HostConfig, IPAddress, IPNetwork, MetricsConfig, MonitorConfig, RegionConfig,
                                   ServiceConfig, StoreConfig, VMConfig)
from control.config.validate import describe, parse_address, parse_prefix, quote, validate

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_POSITION = re.compile(r"(.*) \(at (line \d+, column \d+|end of document)\)")

_T = TypeVar("_T")
# Turns a table's value into the field's (value, key path) -> value; raises ConfigError.
Converter = Callable[[Any, str], Any]


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the TOML config at `path`."""
    source = os.fspath(path)
    return parse_config(read_text(source), source)


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML text; `source` names the file in errors ("<string>": none)."""
    file = None if source == "<string>" else source
    document = parse_document(text, file)
    try:
        return validate(_from_document(document))
    except ConfigError as e:
        raise ConfigError(e.key, e.problem, file) from None


def read_text(source: str) -> str:
    """The UTF-8 text of the file `source`; ConfigError naming it otherwise."""
    try:
        with open(source, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(None, f"cannot read: {e.strerror}", source) from e
    except UnicodeDecodeError as e:
        raise ConfigError(None, f"not UTF-8 (byte {e.start})", source) from e


def parse_document(text: str, file: str | None) -> dict[str, Any]:
    """TOML text as a dict; a syntax error is located by line and column in the key's place."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        match = _TOML_POSITION.fullmatch(str(e))
        where, problem = (match[2], match[1]) if match else (None, str(e))
        raise ConfigError(where, problem, file) from e


_SECTIONS = ("gateway", "region", "service", "vm", "monitor", "center", "agent", "host", "metrics", "store")


def _from_document(document: dict[str, Any]) -> Config:
    for key in document:
        if key not in _SECTIONS:
            raise ConfigError(_toml_key(key), "unknown key")
    if "gateway" not in document:
        raise ConfigError("gateway", "missing required table [gateway]")

    def table(name: str, cls: type[_T]) -> _T | None:
        return from_table(document[name], name, cls, _CONVERTERS) if name in document else None

    return Config(
        gateway=from_table(document["gateway"], "gateway", GatewayConfig, _CONVERTERS),
        regions=from_array(document, "region", RegionConfig, _CONVERTERS),
        services=from_array(document, "service", ServiceConfig, _CONVERTERS),
        vms=tuple(parse_vm(t, f"vm[{i}]") for i, t in enumerate(array_of_tables(document, "vm"))),
        monitor=table("monitor", MonitorConfig),
        center=table("center", CenterLinkConfig),
        agent=table("agent", AgentConfig),
        hosts=from_array(document, "host", HostConfig, _CONVERTERS),
        metrics=table("metrics", MetricsConfig),
        store=table("store", StoreConfig),
    )


def from_array(document: Mapping[str, Any], section: str, cls: type[_T], converters: Mapping[str, Converter],
               skip: Collection[str] = ()) -> tuple[_T, ...]:
    """The `[[section]]` tables of `document` as `cls` entries (none if absent); see from_table."""
    return tuple(from_table(t, f"{section}[{i}]", cls, converters, skip)
                 for i, t in enumerate(array_of_tables(document, section)))


def array_of_tables(document: Mapping[str, Any], section: str) -> list[Any]:
    """The `[[section]]` tables of `document`, unchecked (none if absent)."""
    tables = document.get(section, [])
    # `[region]` instead of `[[region]]` parses as a table; say which one is meant.
    if not isinstance(tables, list):
        raise ConfigError(section, f"expected an array of tables ([[{section}]]), got {describe(tables)}")
    return tables


def parse_vm(table: Any, path: str) -> VMConfig:
    """A [[vm]] table at key path `path` (or a vm.add command's fields) as a VMConfig.
    `ip = "A"` is shorthand for `ips = ["A"]`, which configs written before a VM
    could carry several addresses use."""
    if isinstance(table, dict) and "ip" in table:
        if "ips" in table:
            raise ConfigError(f"{path}.ip", "set ip or ips, not both (ip is shorthand for a one-address ips)")
        ip = parse_address(table["ip"], f"{path}.ip")
        rest = {k: v for k, v in table.items() if k != "ip"}
        return dataclasses.replace(from_table(rest, path, VMConfig, _CONVERTERS), ips=(ip,))
    return from_table(table, path, VMConfig, _CONVERTERS)


def parse_service(table: Any, path: str) -> ServiceConfig:
    """A [[service]] table at key path `path` (or a service.add command's fields) as a ServiceConfig."""
    return from_table(table, path, ServiceConfig, _CONVERTERS)


def from_table(table: Any, path: str, cls: type[_T], converters: Mapping[str, Converter],
               skip: Collection[str] = ()) -> _T:
    """The TOML table at key path `path` as a `cls`: every key a field (except those in
    `skip`, which are filled from elsewhere), every field without a default present;
    a value goes through `converters[key]` if there is one, else as it is."""
    if not isinstance(table, dict):
        raise ConfigError(path, f"expected a table, got {describe(table)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}  # type: ignore[arg-type]
    for key in table:
        if key not in fields:
            raise ConfigError(f"{path}.{_toml_key(key)}", "unknown key")
    for name, f in fields.items():
        if name not in table and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}.{name}", "missing required key")
    return cls(**{k: converters[k](v, f"{path}.{k}") if k in converters else v for k, v in table.items()})


def _parse_array(value: Any, path: str) -> tuple[Any, ...]:
    if not isinstance(value, list):
        raise ConfigError(path, f"expected an array, got {describe(value)}")
    return tuple(value)


def _parse_prefixes(value: Any, path: str) -> tuple[IPNetwork, ...]:
    return tuple(parse_prefix(v, f"{path}[{i}]") for i, v in enumerate(_parse_array(value, path)))


def _parse_addresses(value: Any, path: str) -> tuple[IPAddress, ...]:
    return tuple(parse_address(v, f"{path}[{i}]") for i, v in enumerate(_parse_array(value, path)))


def _parse_health(value: Any, path: str) -> HealthConfig:
    return from_table(value, path, HealthConfig, _CONVERTERS)


# Keys whose TOML text becomes another type; plain values go through as they are,
# since validate() checks their types, once for a file and for a config built in Python.
_CONVERTERS: dict[str, Converter] = {
    "tunnel_source": parse_address,
    "tunnel_source6": parse_address,
    "vip": parse_address,
    "ips": _parse_addresses,
    "tunnel": parse_address,
    "endpoint": parse_address,
    "endpoint6": parse_address,
    "prefixes": _parse_prefixes,
    "vms": _parse_array,
    "health": _parse_health,
    "services": _parse_array,
    "vm_ports": _parse_array,
    "hosts": _parse_array,
    "ports": _parse_array,
    "orchestrator": _parse_array,
}


# ---------------------------------------------------------------- writing


def to_toml(config: Config) -> str:
    """`config` as TOML that parse_config reads back to an equal Config."""
    tables = [_toml_table("[gateway]", config.gateway)]
    tables += [_toml_table("[[region]]", r) for r in config.regions]
    tables += [_toml_table("[[service]]", s) for s in config.services]
    tables += [_toml_table("[[vm]]", v) for v in config.vms]
    tables += [_toml_table(f"[{name}]", getattr(config, name)) for name in ("monitor", "center", "agent", "metrics", "store")
               if getattr(config, name) is not None]
    tables += [_toml_table("[[host]]", h) for h in config.hosts]
    return "\n".join(tables)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else quote(key)


def _toml_table(header: str, entry: Any) -> str:
    lines = [header]
    for f in dataclasses.fields(entry):
        value = getattr(entry, f.name)
        if value is not None:
            lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if dataclasses.is_dataclass(value):  # a nested table (service.health), written inline
        return "{ " + ", ".join(f"{f.name} = {_toml_value(getattr(value, f.name))}"
                                for f in dataclasses.fields(value) if getattr(value, f.name) is not None) + " }"
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))  # strings, addresses, networks


def _toml_string(text: str) -> str:
    # A TOML basic string may not hold '"', '\\' or control characters (DEL included) raw.
    return '"' + "".join(
        f"\\u{ord(c):04x}" if c < " " or c in '"\\\x7f' else c for c in text
    ) + '"'
