"""Hugging Face Hub access that fails in seconds, in one line, when there is no network.

It also tells a hub name from a local path (`looks_like_hub_name`), for every place that
takes either.

Without network huggingface_hub retries every request for half a minute or more, printing a
warning per attempt, before the error comes. One short TCP connect to the Hub's host (or to
the configured HTTPS proxy) answers "is there a network" first; when there is none the
process switches to the libraries' own offline mode, so a model or data set already in the
local cache still loads and a missing one fails at once.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import urllib.parse
import urllib.request

log = logging.getLogger(__name__)

# Long enough for a slow but working network, short enough that "no network" costs little.
CONNECT_TIMEOUT_S = 3.0

_reachable: dict[tuple[str, int], bool] = {}


def looks_like_hub_name(path: str) -> bool:
    """Whether `path` can name a Hub repository: "owner/name" or "name", relative, no backslash.

    Anything else can only be a local path, so when it is missing the error says so at once
    instead of asking the Hub for a name it cannot hold.
    """
    return not (path.startswith(("/", ".", "~")) or "\\" in path or path.count("/") > 1)


def offline_mode() -> bool:
    """Whether huggingface_hub (and with it transformers and datasets) is in offline mode."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_address() -> tuple[str, int]:
    """(host, port) a request to the Hub first connects to: its endpoint, or the HTTPS proxy."""
    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(endpoint.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            return parsed.hostname, parsed.port or 80
    return host, port


def reachable(address: tuple[str, int], timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `address` opens within `timeout` seconds (memoised).

    The connect runs in a thread because name resolution ignores socket timeouts and can
    hang far longer than `timeout` on a machine without a working resolver.
    """
    if address in _reachable:
        return _reachable[address]
    outcome: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    _reachable[address] = bool(outcome and outcome[0])
    return _reachable[address]


def go_offline_if_unreachable() -> bool:
    """Before a hub lookup: switch to offline mode when the Hub cannot be reached.

    Returns True when the process is offline (set by the user, or by this check). Offline
    mode is the libraries' documented switch (`HF_HUB_OFFLINE=1`); it is set in the
    environment and in the already-imported modules, which read it at import time.
    """
    if offline_mode():
        return True
    address = hub_address()
    if reachable(address):
        return False
    log.warning(
        "the Hugging Face Hub cannot be reached (%s:%d): using the local cache only",
        *address,
    )
    set_offline_mode()
    return True


def set_offline_mode() -> None:
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:  # imported later, it reads the environment variable
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


def offline_reason() -> str:
    """Why hub files cannot be fetched now, for an error message."""
    address = hub_address()
    if _reachable.get(address) is False:
        return f"the Hugging Face Hub cannot be reached ({address[0]}:{address[1]}, no network?)"
    return "offline mode is on (HF_HUB_OFFLINE=1)"
