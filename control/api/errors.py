"""The errors a command handler raises, each carrying the HTTP status it answers
with; the unix socket carries only the message."""
from __future__ import annotations


class CommandError(RuntimeError):
    """A request that cannot be carried out; the message names the culprit."""

    status = 400


class BadRequest(CommandError):
    status = 400


class Forbidden(CommandError):
    """The caller's scope may not call this command (control/api/commands.py)."""

    status = 403


class NotFound(CommandError):
    status = 404


class Refused(CommandError):
    """Well-formed, but the current state does not allow it."""

    status = 409


# A handler's failures: answered as an error reply; anything else is a bug and propagates.
HANDLER_ERRORS = (ValueError, KeyError, TypeError, RuntimeError, OSError)


def as_command_error(exc: BaseException) -> CommandError:
    """`exc` as a CommandError with the same message: a failed lookup (LookupError:
    an unknown VM, region, service, request) is NotFound, anything else BadRequest."""
    if isinstance(exc, CommandError):
        return exc
    # KeyError's str() is the repr of its argument: use the argument itself;
    # stripping quotes from str() would eat the closing quote of "unknown VM 'x'"
    message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
    return (NotFound if isinstance(exc, LookupError) else BadRequest)(message)
