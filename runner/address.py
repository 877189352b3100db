"""Ray addresses, read the way Ray's own tools read them.

A cluster has two addresses:
- its bootstrap (GCS) address, which `ray.init` joins: `HOST:6379` (the port `ray start --head`
  prints), `ray://HOST:10001` (Ray Client) or `auto` (a cluster started on this machine);
- its Jobs API address, the dashboard's `http://HOST:8265`; Ray's job tools also accept a bootstrap
  address and look the dashboard up through it.

Order: `tessera run` takes `--address`, then RAY_ADDRESS (no address: a local Ray). The job commands
(submit, status, logs, stop, list, fetch) take `--address`, then RAY_API_SERVER_ADDRESS, then
RAY_ADDRESS, the variables in the order `ray job` reads them. A dashboard URL given to `tessera run`
is refused with the two ways forward (it is no address `ray.init` can join), and every address is
tried with one TCP connection first, so an unreachable one fails in seconds with one line rather
than after Ray's minute of retries.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

CONNECT_TIMEOUT_S = 5.0


class AddressError(ValueError):
    """An address that is missing, malformed, of the wrong kind or unreachable; names it."""


@dataclass(frozen=True)
class Address:
    """value: the address as Ray takes it; host and port: where a TCP check connects (None for auto)."""

    value: str
    host: str | None
    port: int | None


def _split(address: str, default_port: int) -> tuple[str, int]:
    split = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = split.port or default_port
    except ValueError:
        raise AddressError(f"address {address!r} has a bad port") from None
    if not split.hostname:
        raise AddressError(f"address {address!r} names no host")
    return split.hostname, port


def cluster_address(explicit: str | None, env: Mapping[str, str]) -> Address | None:
    """The cluster `tessera run` joins, or None to start a local Ray."""
    address = (explicit or env.get("RAY_ADDRESS") or "").strip()
    where = "--address" if explicit else "RAY_ADDRESS"
    if not address:
        return None
    if address == "auto":
        return Address(address, None, None)
    scheme = address.split("://", 1)[0].lower() if "://" in address else ""
    if scheme in ("http", "https"):
        host, _ = _split(address, 8265)
        raise AddressError(
            f"{where}={address} is a dashboard (Jobs API) address: `tessera run` joins a cluster by its "
            f"bootstrap address (e.g. {host}:6379, as `ray start --head` prints it), and "
            f"`tessera submit` sends the job to {address}"
        )
    if scheme not in ("", "ray"):
        raise AddressError(f"{where}={address}: expected HOST:PORT, ray://HOST:PORT or auto")
    host, port = _split(address, 10001 if scheme == "ray" else 6379)
    return Address(address, host, port)


def jobs_address(explicit: str | None, env: Mapping[str, str]) -> Address:
    """The Jobs API address of the job commands."""
    address = (explicit or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS") or "").strip()
    if not address:
        raise AddressError(
            "no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS "
            "(or RAY_ADDRESS)"
        )
    address = address.rstrip("/")
    scheme = address.split("://", 1)[0].lower() if "://" in address else ""
    if address == "auto":
        return Address(address, None, None)
    if scheme not in ("", "http", "https", "ray"):
        raise AddressError(f"address {address!r}: expected http(s)://HOST:PORT, HOST:PORT or ray://HOST:PORT")
    default = {"http": 8265, "https": 443, "ray": 10001}.get(scheme, 6379)
    host, port = _split(address, default)
    return Address(address, host, port)


def check_reachable(address: Address, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """One TCP connection to the address; AddressError naming it when nothing answers."""
    if address.host is None:
        return
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout_s):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise AddressError(
            f"cannot reach Ray at {address.value} ({address.host}:{address.port}: {reason})"
        ) from None
