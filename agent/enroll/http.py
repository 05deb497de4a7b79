"""The agent's HTTP transport to the registrar (requests), with the registrar's CA pinned.

Blocking; the daemon runs it in a thread. Transport failures become typed
errors (RegistrarUnreachable, RegistrarNotTrusted), refusals become the
registrar's Problem (with Retry-After when given), and a response that is not
a valid message becomes a ProtocolError.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
import warnings
from pathlib import Path
from typing import Any, TypeVar

import requests

from agent import __version__
from agent.access import access_denied
from agent.codec import decode_json_object
from agent.enroll.messages import (
    API_PREFIX,
    Challenge,
    CompleteRequest,
    Decommissioned,
    DecommissionRequest,
    DeviceChallenge,
    DeviceChallengeRequest,
    Issued,
    Renewed,
    RenewRequest,
    StartRequest,
    decode,
    encode,
)
from agent.enroll.problems import PROBLEM_CONTENT_TYPE, problem_from_document
from agent.errors import (
    DevidError,
    Problem,
    ProtocolError,
    RegistrarNotTrusted,
    RegistrarNotValidNow,
    RegistrarUnreachable,
)

M = TypeVar("M", Challenge, Issued, DeviceChallenge, Renewed, Decommissioned)
MAX_RESPONSE = 256 * 1024


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """RFC 9110 Retry-After: delay-seconds or an HTTP-date; None if absent or unparsable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now if now is not None else time.time()))


class RegistrarClient:
    def __init__(self, url: str, ca_file: Path, timeout: float = 30.0) -> None:
        self.base = url.rstrip("/")
        self.ca_file = ca_file
        self.timeout = timeout
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"devid-agent/{__version__}"
        # Server-Timing of the last response, in ms (benchmarks split network from server work)
        self.last_server_ms: float | None = None
        # The registrar's clock minus ours, from the last response's Date header (seconds,
        # ±1 s resolution): what status shows when a certificate is "not yet valid".
        self.clock_offset: float | None = None

    def close(self) -> None:
        self._session.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> requests.Response:
        url = f"{self.base}{API_PREFIX}{path}"
        try:
            # verify= per request: a session-level setting would lose to REQUESTS_CA_BUNDLE
            # from the environment, silently unpinning the registrar's CA.
            response = self._session.request(method, url, json=body, timeout=self.timeout,
                                             stream=True, verify=str(self.ca_file))
        except requests.exceptions.SSLError as e:
            dated = any(m in str(e) for m in ("certificate is not yet valid",
                                              "certificate has expired"))
            raise (RegistrarNotValidNow if dated else RegistrarNotTrusted)(
                f"{self.base}: TLS verification failed with the pinned CA {self.ca_file}: "
                + ("the registrar's certificate is not valid at this gateway's time "
                   f"({time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime())}): the clock is "
                   "probably wrong" if dated else _reason(e)),
                "fix the gateway's time synchronization (NTP), then `devidctl check`"
                if dated else None) from None
        except requests.exceptions.Timeout:
            raise RegistrarUnreachable(f"{self.base}: no answer within {self.timeout:.0f}s") \
                from None
        except requests.exceptions.RequestException as e:
            raise RegistrarUnreachable(f"{self.base}: {_reason(e)}") from None
        except OSError as e:  # requests opens the CA file itself ("invalid path")
            raise _pinned_ca_problem(self.base, self.ca_file, e) from None
        self.last_server_ms = _server_ms(response.headers.get("Server-Timing"))
        self.clock_offset = _clock_offset(response.headers.get("Date"))
        return response

    def _body(self, response: requests.Response) -> bytes:
        data = response.raw.read(MAX_RESPONSE + 1, decode_content=True)
        if len(data) > MAX_RESPONSE:
            raise ProtocolError(f"{self.base}: response larger than {MAX_RESPONSE} bytes")
        return bytes(data)

    def _exchange(self, path: str, body: dict[str, Any], model: type[M]) -> M:
        response = self._request("POST", path, body)
        data = self._body(response)
        if response.status_code >= 400:
            raise self._problem(response, data)
        return decode(model, data, _bad_response)

    def _problem(self, response: requests.Response, data: bytes) -> Problem:
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        doc: dict[str, Any] = {}
        if content_type == PROBLEM_CONTENT_TYPE:
            try:
                doc = decode_json_object(data, "problem", _bad_response)
            except ProtocolError:
                doc = {}
        if not doc:
            doc = {"type": f"http-{response.status_code}",
                   "detail": f"HTTP {response.status_code} {response.reason} from the registrar"}
        p = problem_from_document(doc, response.status_code)
        p.retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        return p

    def unverified_clock_offset(self) -> float | None:
        """The registrar's clock minus ours from a Date header read WITHOUT verifying TLS.

        Only for diagnostics, when verification failed on a date: a peer on the path could
        lie, so this never plans a renewal; it lets `devidctl check` say "the clock is 2 days
        behind" instead of blaming the registrar's certificate."""
        import urllib3

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                response = self._session.get(f"{self.base}{API_PREFIX}/health", stream=True,
                                              timeout=self.timeout, verify=False)
        except requests.exceptions.RequestException:
            return None
        response.close()
        return _clock_offset(response.headers.get("Date"))

    def health(self) -> dict[str, Any]:
        response = self._request("GET", "/health", None)
        data = self._body(response)
        if response.status_code != 200:
            raise self._problem(response, data)
        return decode_json_object(data, "health", _bad_response)

    def start(self, request: StartRequest) -> Challenge:
        return self._exchange("/enrollments", encode(request), Challenge)

    def complete(self, challenge_id: str, request: CompleteRequest) -> Issued:
        return self._exchange(f"/enrollments/{challenge_id}/complete", encode(request), Issued)

    def challenge(self, request: DeviceChallengeRequest) -> DeviceChallenge:
        return self._exchange("/challenges", encode(request), DeviceChallenge)

    def renew(self, challenge_id: str, request: RenewRequest) -> Renewed:
        return self._exchange(f"/challenges/{challenge_id}/renew", encode(request), Renewed)

    def decommission(self, challenge_id: str, request: DecommissionRequest) -> Decommissioned:
        return self._exchange(f"/challenges/{challenge_id}/decommission", encode(request),
                              Decommissioned)


def _pinned_ca_problem(base: str, ca_file: Path, error: OSError) -> DevidError:
    """Why requests could not use the pinned CA file, in words."""
    try:
        with ca_file.open("rb"):
            pass
    except FileNotFoundError:
        return RegistrarNotTrusted(f"{ca_file}: the pinned registrar CA is missing",
                                   "restore the file [enrollment] ca names")
    except PermissionError:
        return access_denied(ca_file, "the pinned registrar CA ([enrollment] ca)")
    except OSError as e:
        return RegistrarNotTrusted(f"{ca_file}: cannot read the pinned registrar CA: "
                                   f"{e.strerror}")
    return RegistrarNotTrusted(f"{base}: cannot use the pinned CA {ca_file}: {error}")


def _bad_response(message: str) -> ProtocolError:
    return ProtocolError(f"the registrar's response is not valid: {message}",
                         "the registrar may run an incompatible version")


def _reason(e: Exception) -> str:
    # requests nests the interesting part (e.g. "Connection refused") a few levels deep
    text = str(e)
    for marker in ("certificate verify failed", "Connection refused", "Name or service not known",
                   "No route to host", "timed out", "hostname"):
        if marker in text:
            return marker if marker != "hostname" else "hostname mismatch"
    return text[:200]


def _clock_offset(header: str | None, now: float | None = None) -> float | None:
    if not header:
        return None
    try:
        server = email.utils.parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError):
        return None
    return server - (now if now is not None else time.time())


def _server_ms(header: str | None) -> float | None:
    if not header:
        return None
    for metric in header.split(","):
        for param in metric.split(";")[1:]:
            key, _, value = param.strip().partition("=")
            if key == "dur":
                try:
                    return float(value)
                except ValueError:
                    return None
    return None


class ThreadedRegistrar:
    """The Registrar and LifecycleRegistrar ports: each blocking exchange runs in a thread."""

    def __init__(self, client: RegistrarClient) -> None:
        self.client = client

    async def start(self, request: StartRequest) -> Challenge:
        return await asyncio.to_thread(self.client.start, request)

    async def complete(self, challenge_id: str, request: CompleteRequest) -> Issued:
        return await asyncio.to_thread(self.client.complete, challenge_id, request)

    async def challenge(self, request: DeviceChallengeRequest) -> DeviceChallenge:
        return await asyncio.to_thread(self.client.challenge, request)

    async def renew(self, challenge_id: str, request: RenewRequest) -> Renewed:
        return await asyncio.to_thread(self.client.renew, challenge_id, request)

    async def decommission(self, challenge_id: str,
                           request: DecommissionRequest) -> Decommissioned:
        return await asyncio.to_thread(self.client.decommission, challenge_id, request)
