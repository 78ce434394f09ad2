"""Shared state (VMs, hosts, offloads, gateway membership, the center's requests):
one interface, two backends.

    open_store("sqlite:///var/lib/xdpgw/state.db")          one machine, nothing else to run (sqlite.py)
    open_store("etcd://H:P,H:P,H:P", tls=..., auth=...)      a fleet on etcd v3.4 (etcd.py)

A Store maps string keys to JSON objects, with etcd's model on both backends:

    get(key) -> Entry | None
    range(prefix) -> (entries, revision)            a snapshot and its revision: watch from revision + 1
    put(key, value, lease=None) -> revision
    put_if(key, value, mod_revision, lease=None)    compare-and-swap on the key's mod_revision (0: must not
                                                    exist); Conflict if it lost
    delete(key, mod_revision=None) -> bool          Conflict if mod_revision is given and is not the key's
    delete_range(start, end) -> int                 every key in [start, end), as one revision; how many
    keys(prefix, limit) -> (keys, count)            the first `limit` keys under prefix in key order (not their
                                                    values), and how many keys the prefix holds
    watch(prefix, start_revision, on_event)         events >= start_revision in order, from a thread, resumed by
                                                    itself after a lost connection; stops with Watch.error =
                                                    Compacted when that revision is gone (re-list, watch again)
    lease(ttl_s) -> Lease                           kept alive until Lease.revoke(); Lease.lost when it expired
    campaign(election, name, ttl_s, stop=None)      blocks until leader (a key under a lease); Leadership.lost,
                                                    Leadership.resign(); Cancelled when `stop` is set first
    revision(), compact(revision), close()

open_configured(config) opens the store of a [store] table (control.config.StoreConfig).

Errors: StoreError; Unavailable (retryable), Conflict, Compacted, Cancelled.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from control.store.base import (Cancelled, Compacted, Conflict, Entry, Event, Lease, Store, StoreError, StoreTLS,
                                Unavailable, Watch)
from control.store.election import Leadership

if TYPE_CHECKING:
    from control.config import StoreConfig

__all__ = ["Cancelled", "Compacted", "Conflict", "Entry", "Event", "Lease", "Leadership", "Store", "StoreError",
           "StoreTLS", "Unavailable", "Watch", "open_configured", "open_store", "parse_url"]

_ETCD_MEMBER = re.compile(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})")


def parse_url(url: str) -> tuple[str, str | list[tuple[str, int]]]:
    """("sqlite", path) or ("etcd", [(host, port), ...]); ValueError saying what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("sqlite", "etcd"):
        raise ValueError(f"{url!r} is not sqlite:///PATH or etcd://HOST:PORT[,HOST:PORT...]")
    if scheme == "sqlite":
        if not rest.startswith("/"):
            raise ValueError(f"{url!r}: the SQLite path must be absolute (sqlite:///var/lib/xdpgw/state.db)")
        return "sqlite", rest
    members = []
    for member in rest.split(","):
        match = _ETCD_MEMBER.fullmatch(member)
        port = int(match[2] or match[4]) if match else 0
        if not 0 < port < 65536:
            raise ValueError(f"{url!r}: {member!r} is not HOST:PORT or [ADDR6]:PORT")
        members.append((match[1] or match[3], port))
    return "etcd", members


def open_store(url: str, *, tls: StoreTLS | None = None, auth: tuple[str, str] | None = None) -> Store:
    """The store at `url`. TLS and auth are etcd's (ValueError with a SQLite url)."""
    kind, where = parse_url(url)
    if kind == "sqlite":
        if tls is not None or auth is not None:
            raise ValueError(f"{url!r}: TLS and auth are for an etcd:// store")
        from control.store.sqlite import SqliteStore

        assert isinstance(where, str)
        return SqliteStore(where)
    from control.store.etcd import EtcdStore

    assert isinstance(where, list)
    return EtcdStore(where, tls, auth)


def open_configured(config: StoreConfig) -> Store:
    """The store a validated [store] table names (control/config/validate.py check_store):
    the TLS files and the etcd user, whose password is the first line of password_file."""
    tls = None
    if config.ca is not None or config.cert is not None:
        tls = StoreTLS(config.ca, config.cert, config.key)
    auth = None
    if config.user is not None and config.password_file is not None:
        with open(config.password_file, encoding="utf-8") as f:
            auth = (config.user, f.readline().rstrip("\r\n"))
    return open_store(config.url, tls=tls, auth=auth)
