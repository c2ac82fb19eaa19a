"""Reaching a node over JSON-RPC, with failures a person can act on.

requests and web3 report a dead node, a wrong port or a slow provider as exceptions several
lines long (urllib3's pool, retries, the socket error buried inside). An operator typing
``--rpc`` needs one line that names the URL and what went wrong, so everything that crosses the
network from the command line runs inside :func:`rpc_errors`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import requests
from web3 import Web3
from web3.exceptions import (
    ContractLogicError,
    TimeExhausted,
    Web3Exception,
    Web3RPCError,
)
from web3.providers.rpc.utils import ExceptionRetryConfiguration

from truscl.chain.reader import one_line
from truscl.errors import ChainError, ConfigError, TrusclError

DEFAULT_TIMEOUT = 10.0  # seconds per request: a testnet provider answers well within it

_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def connect(url: str, timeout: float = DEFAULT_TIMEOUT) -> Web3:
    """A web3 client of the node at ``url``, after one request proved the node answers.

    ``Web3.is_connected`` would say only "no"; asking for the chain id under
    :func:`rpc_errors` says why (refused, timed out, not a JSON-RPC endpoint).
    """
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"RPC URL {url!r} must start with http:// or https://")
    # web3 retries a failed request 5 times by default: with a 10 s timeout a hung provider
    # would hold the command for a minute. One retry rides out a blip and no more.
    provider = Web3.HTTPProvider(
        url,
        request_kwargs={"timeout": timeout},
        exception_retry_configuration=ExceptionRetryConfiguration(
            errors=(ConnectionError, requests.HTTPError, requests.Timeout), retries=2
        ),
    )
    w3 = Web3(provider)
    with rpc_errors(url):
        w3.eth.chain_id  # noqa: B018 - the request is the point
    return w3


@contextmanager
def rpc_errors(url: str) -> Iterator[None]:
    """Turn network and node failures into one-line ``ChainError``s that name ``url``.

    truscl's own errors (a decoded revert is already a ``ChainError``) pass through.
    """
    try:
        yield
    except TrusclError:
        raise
    except requests.Timeout:
        raise ChainError(f"the JSON-RPC node at {url} did not answer in time") from None
    except requests.ConnectionError as exc:
        raise ChainError(f"cannot reach a JSON-RPC node at {url}: {_cause(exc)}") from None
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise ChainError(f"the server at {url} answered HTTP {status}, not JSON-RPC") from None
    except requests.RequestException as exc:
        raise ChainError(f"request to {url} failed: {one_line(str(exc))}") from None
    except TimeExhausted as exc:
        raise ChainError(f"the node at {url}: {one_line(str(exc))}") from None
    except ContractLogicError as exc:
        raise ChainError(f"call reverted on {url}: {one_line(str(exc))}") from None
    except Web3RPCError as exc:
        raise ChainError(f"the node at {url} refused: {_rpc_message(exc)}") from None
    except Web3Exception as exc:
        raise ChainError(f"unexpected answer from {url}: {one_line(str(exc))}") from None
    except ValueError as exc:  # a body that is not JSON: a web server, not a node
        raise ChainError(f"{url} is not a JSON-RPC endpoint: {one_line(str(exc))}") from None
    except OSError as exc:
        raise ChainError(f"cannot reach {url}: {exc.strerror or exc}") from None


def _cause(exc: Exception) -> str:
    """The socket-level reason ("Connection refused", "Name or service not known")."""
    match = _ERRNO.search(str(exc))
    return match.group(1).strip() if match else "connection failed"


def _rpc_message(exc: Web3RPCError) -> str:
    response = exc.rpc_response or {}
    error = response.get("error") if isinstance(response, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return one_line(error["message"])
    return one_line(str(exc))
