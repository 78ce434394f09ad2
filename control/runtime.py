"""Services and VMs added to a running gateway (`service.add`, `vm.add`, and their
`remove`s), kept in the gateway's store so that a restart and a reload of the
config file keep them.

An addition is kept as the table its command gave: the keys of a [[service]] or
[[vm]] table of the file, and for a VM also `services`, the services (of the file
or added) it joins. The running config is the file's entries followed by the
additions, checked by the same validator as the file alone, so a command's
error reads like the file's: the entry the command changes is named by the
command and its key (`vm.add: mac: ...`), an entry of the file by its place in
the file (`vm[2] "web3"`), another addition by its name (`runtime vm "dv1"`).

All additions of a gateway are one value in the store, so that a change, even
one that touches several entries (removing a service takes it out of the VMs
that joined it), is one write."""
from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from typing import Any

from control.config import Config, ConfigError, validate
from control.config.toml import parse_service, parse_vm
from control.config.validate import describe, quote
from control.gateway import GatewayError, UnknownName
from control.store.base import Conflict, Store

SECTIONS = ("service", "vm")
COMMANDS = ("service.add", "service.remove", "vm.add", "vm.remove")

# section -> {name: table as the command gave it}
Tables = dict[str, dict[str, dict[str, Any]]]

# `vm[3]` or `service[0] "web"` in a validator's key path or message
_REF = re.compile(r'\b(service|vm)\[(\d+)\]( "(?:[^"\\]|\\.)*")?')


class FileEntry(GatewayError):
    """A command that would change an entry of the config file: that is the file's business."""


def empty() -> Tables:
    return {section: {} for section in SECTIONS}


class RuntimeAdditions:
    """The additions of gateway `gateway`, in `store` under one key. Not thread-safe:
    the daemon makes its changes one at a time."""

    def __init__(self, store: Store, gateway: str) -> None:
        self.store = store
        self.key = f"/xdpgw/runtime/{gateway}"
        self.tables = empty()
        self.revision = 0            # the key's mod_revision as last read or written (0: absent)

    def load(self) -> Tables:
        entry = self.store.get(self.key)
        self.tables = empty()
        self.revision = 0
        if entry is not None:
            self.tables.update({section: dict(entry.value.get(section, {})) for section in SECTIONS})
            self.revision = entry.mod_revision
        return self.tables

    def save(self, tables: Tables) -> None:
        """Write `tables` in place of what was loaded; GatewayError if someone else wrote them since."""
        try:
            self.revision = self.store.put_if(self.key, tables, self.revision)
        except Conflict:
            raise GatewayError(f"the run-time additions in the store ({self.key}) were changed by another "
                               "process; nothing was changed") from None
        self.tables = tables


def changed(tables: Tables, file: Config, command: str, args: dict[str, Any]) -> tuple[Tables, str]:
    """The additions after `command` (one of COMMANDS) with `args`, and the name it
    changes; nothing is written. Adding an entry that is already added with the same
    table changes nothing (a retried command succeeds). ConfigError (located at the
    command), UnknownName, or FileEntry if the command cannot be carried out."""
    section, action = command.split(".")
    name = args.get("name")
    if not isinstance(name, str):
        raise ConfigError("name", "missing required key" if name is None else f"expected a string, got "
                          f"{describe(name)}", command)
    out = copy.deepcopy(tables)
    mine = out[section]
    if action == "add":
        table = {k: v for k, v in args.items() if v is not None}     # TOML has no null: an absent key
        if name in mine and mine[name] != table:
            raise ConfigError("name", f"{section} {quote(name)} was added at run time with other keys; "
                              f"remove it first ({section}.remove)", command)
        mine[name] = table
        return out, name
    # an addition goes also when the file has come to define its name (the way out of that conflict)
    if name not in mine and name in {e.name for e in (file.services if section == "service" else file.vms)}:
        raise FileEntry(f"{command}: {section} {quote(name)} is defined in the config file; remove it there and "
                        "reload (xdpgw reload)")
    if name not in mine:
        raise UnknownName(f"{command}: unknown {section} {quote(name)} (not added at run time)")
    del mine[name]
    if section == "service":
        for vm in out["vm"].values():
            if name in (vm.get("services") or ()):
                vm["services"] = [s for s in vm["services"] if s != name]
    else:
        for service_name, service in out["service"].items():
            vms = service.get("vms")
            if isinstance(vms, list) and name in vms:
                if vms == [name]:
                    raise ConfigError("name", f"VM {quote(name)} is the only VM of service {quote(service_name)} "
                                      f"(added at run time); remove the service first (service.remove)", command)
                service["vms"] = [v for v in vms if v != name]
    return out, name


def merged(file: Config, tables: Tables, *, source: str | None = None, command: str | None = None,
           subject: str | None = None) -> Config:
    """The validated config of the file `file` and the additions `tables`.

    For a command (`command` changed the entry `subject`, which goes last): errors
    are located at it. Else (a start or reload, `source`: the file) an addition
    with the name of an entry of the file is an error naming both."""
    order = _order(tables, subject)
    locate = locate_errors(file, tables, source, command, subject)
    if command is None:
        for section, entries in (("service", file.services), ("vm", file.vms)):
            for i, entry in enumerate(entries):
                if entry.name in tables[section]:
                    raise ConfigError(f"{section}[{i}].name", f"{quote(entry.name)} is also the name of a {section} "
                                      f"added at run time; rename one, or remove the run-time one (xdpgw {section} "
                                      f"remove {entry.name}) first", source)
    try:
        services = list(file.services)
        for i, name in enumerate(order["service"], start=len(file.services)):
            services.append(parse_service(tables["service"][name], f"service[{i}]"))
        vms = list(file.vms)
        joins: list[tuple[int, str, Any]] = []
        for i, name in enumerate(order["vm"], start=len(file.vms)):
            table = dict(tables["vm"][name])
            joins.append((i, name, table.pop("services", None)))
            vms.append(parse_vm(table, f"vm[{i}]"))
        by_name = {s.name: k for k, s in enumerate(services)}
        for i, name, joined in joins:
            if joined is None:
                continue
            if not isinstance(joined, list):
                raise ConfigError(f"vm[{i}].services", f"expected an array, got {describe(joined)}")
            for j, service in enumerate(joined):
                if not isinstance(service, str) or service not in by_name:
                    problem = (f"unknown service {quote(service)}" if isinstance(service, str)
                               else f"expected a string, got {describe(service)}")
                    raise ConfigError(f"vm[{i}].services[{j}]", problem)
                k = by_name[service]
                services[k] = dataclasses.replace(services[k], vms=(*services[k].vms, name))
        return validate(dataclasses.replace(file, services=tuple(services), vms=tuple(vms)))
    except ConfigError as exc:
        raise locate(exc) from None


def _order(tables: Tables, subject: str | None) -> dict[str, list[str]]:
    """The additions in the order they follow the file's entries: by name, the entry a command changes last."""
    return {section: sorted(tables[section], key=lambda n: (n == subject, n)) for section in SECTIONS}


def locate_errors(file: Config, tables: Tables, source: str | None, command: str | None = None,
                  subject: str | None = None) -> Callable[[ConfigError], ConfigError]:
    """What turns an error about the config `merged(file, tables, ...)` (also from the
    gateway's own checks of it, which name entries by their place in it) into one
    located as the module's docstring says."""
    order = _order(tables, subject)
    counts = {"service": len(file.services), "vm": len(file.vms)}
    names = {"service": [s.name for s in file.services] + order["service"],
             "vm": [v.name for v in file.vms] + order["vm"]}
    target = (command.split(".")[0], subject) if command else None

    def added(m: re.Match[str]) -> str | None:
        """The name of the addition `m` refers to; None for an entry of the file."""
        section, i = m[1], int(m[2])
        return names[section][i] if counts[section] <= i < len(names[section]) else None

    def ref(m: re.Match[str]) -> str:
        name = added(m)
        return m[0] if name is None else f"runtime {m[1]} {quote(name)}"

    def locate(exc: ConfigError) -> ConfigError:
        key = exc.key
        m = _REF.match(key or "")
        if m and target is not None and (m[1], added(m)) == target:
            key = key[m.end():].lstrip(".") or None
        return ConfigError(_REF.sub(ref, key) if key else None, _REF.sub(ref, exc.problem), command or source)

    return locate
