"""Command tables: a command's name -> its handler (a dict of JSON arguments in,
a JSON-able result out), the argument validators the handlers share, and the
one dispatch that both the unix-socket API and the HTTP agent API call.

Every call comes from a scope. LOCAL (the root-only unix socket) may call every
command; any other scope only the commands that name it (`scoped`): the HTTP
agent serves CENTER, so the center's token reaches what its workflow needs and
nothing that moves a VM, changes a weight, resets state or arms a capture."""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

from control.api.errors import HANDLER_ERRORS, BadRequest, Forbidden, NotFound, as_command_error

Handler = Callable[[dict[str, Any]], Any]

LOCAL = "local"
CENTER = "center"


@dataclass(frozen=True)
class Scoped:
    """A handler that the scopes in `scopes` may call besides LOCAL."""
    handler: Handler
    scopes: frozenset[str]

    def __call__(self, args: dict[str, Any]) -> Any:
        return self.handler(args)


def scoped(handler: Handler, *scopes: str) -> Scoped:
    """`handler`, open to `scopes` as well as to LOCAL; a plain handler is LOCAL only."""
    return Scoped(handler, frozenset(scopes))


def allowed(handler: Handler, scope: str) -> bool:
    """Whether a caller in `scope` may call `handler`."""
    return scope == LOCAL or (isinstance(handler, Scoped) and scope in handler.scopes)


class CommandTable(Mapping[str, Handler]):
    """Read-only once built; tables of several services are joined with `merge`."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self._handlers = dict(handlers)

    def __getitem__(self, name: str) -> Handler:
        return self._handlers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)


def merge(*tables: Mapping[str, Handler]) -> CommandTable:
    """One table from several. A name in two of them is a wiring mistake: no table
    silently replaces another's command."""
    out: dict[str, Handler] = {}
    for table in tables:
        clash = sorted(out.keys() & table.keys())
        if clash:
            raise ValueError(f"commands {clash} are defined twice")
        out.update(table)
    return CommandTable(out)


def arg(args: Mapping[str, Any], name: str, kind: type = str, required: bool = True,
        noun: str = "argument") -> Any:
    """`args[name]` if it is a `kind` (a bool is no int), None if absent and not required;
    else BadRequest. `noun` names what the caller calls its arguments."""
    value = args.get(name)
    if value is None:
        if required:
            raise BadRequest(f"missing {noun} {name!r}")
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadRequest(f"{noun} {name!r} must be a {kind.__name__}")
    return value


def int_arg(args: Mapping[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    """`args[name]` (or `default` if absent) if it is an int in low..high; else BadRequest."""
    value = args.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"argument {name!r} must be an int in {low}..{high}")
    return value


def parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


def handler_of(table: Mapping[str, Handler], name: str, scope: str = LOCAL) -> Handler:
    """The handler of `name` if `scope` may call it; NotFound (naming the commands the
    scope may call) or Forbidden otherwise."""
    handler = table.get(name)
    if handler is None:
        known = sorted(n for n, h in table.items() if allowed(h, scope))
        raise NotFound(f"unknown command {name!r}; known: {known}")
    if not allowed(handler, scope):
        open_to = sorted({LOCAL, *getattr(handler, "scopes", ())})
        raise Forbidden(f"command {name!r} is not open to the {scope} scope (open to: {', '.join(open_to)})")
    return handler


def dispatch(table: Mapping[str, Handler], name: str, args: dict[str, Any], scope: str = LOCAL) -> Any:
    """Run command `name` on `args` for a caller in `scope`: its result, or a CommandError saying why not."""
    handler = handler_of(table, name, scope)
    try:
        return handler(args)
    except HANDLER_ERRORS as exc:
        raise as_command_error(exc) from None
