"""The registrar's HTTP edge: routes, body limits, and Problem -> problem+json.

Handlers only move bytes: the body is read under a size cap and handed to
EnrollmentService (in a worker thread, since verification is CPU work), whose
messages or Problems become the response. Anything unexpected is logged here
with its traceback and answered with a generic 500 problem, never a trace.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent import __version__, faults
from agent.enroll.messages import API_PREFIX, encode
from agent.enroll.problems import PROBLEM_CONTENT_TYPE, problem, problem_document
from agent.errors import Problem
from agent.registrar.admission import InFlightLimit
from agent.registrar.config import CA_ISSUERS_PATH, CRL_PATH
from agent.registrar.lifecycle import LifecycleService
from agent.registrar.sealedchallenge import ID_FORM as SEALED_ID_FORM
from agent.registrar.sealedchallenge import ID_PATTERN as SEALED_ID
from agent.registrar.service import EnrollmentService

log = logging.getLogger(__name__)

CHALLENGE_ID = re.compile(r"^[0-9a-f]{32}$")
CRL_CONTENT_TYPE = "application/pkix-crl"
CA_CERT_CONTENT_TYPE = "application/pkix-cert"


def problem_response(p: Problem, instance: str | None = None,
                     extra: Mapping[str, str] | None = None) -> Response:
    headers = dict(extra or {})
    if p.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(p.retry_after)))
    return JSONResponse(problem_document(p, instance), status_code=p.status, headers=headers,
                        media_type=PROBLEM_CONTENT_TYPE)


async def read_body(request: Request, limit: int) -> bytes:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise problem("unsupported-media-type",
                      f"Content-Type is {content_type or 'missing'!r}, expected application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise problem("body-too-large", f"body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise problem("body-too-large", f"body exceeds the limit of {limit} bytes")
    return bytes(body)


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def _verify(handler: Any, *args: str) -> Any:
    """In a worker thread: the service's decision (a failpoint lets tests hold a slot)."""
    faults.point("registrar.verify")
    return handler(*args)


def create_app(service: EnrollmentService, lifecycle: LifecycleService,
               max_body: int, max_in_flight: int = 8) -> Starlette:
    limit = InFlightLimit(max_in_flight)

    async def respond(request: Request, status: int, handler: Any, *args: str,
                      verifies: bool = True) -> Response:
        """`verifies`: the handler does verification work, counted by max_in_flight
        (issuing a sealed device challenge does not: one HMAC, no state)."""
        began = time.perf_counter()
        response: Response
        try:
            if verifies:
                limit.enter()
        except Problem as p:
            return problem_response(p, request.url.path)
        try:
            body = await read_body(request, max_body)
            message = await run_in_threadpool(_verify, handler, *args, body, _peer(request))
        except Problem as p:
            response = problem_response(p, request.url.path)
        else:
            response = JSONResponse(encode(message), status_code=status,
                                    headers={"Cache-Control": "no-store"})
        finally:
            if verifies:
                limit.leave()
        # Refusals too: what a refused request cost is worth seeing (bench/clock_skew.py).
        response.headers["Server-Timing"] = \
            f"app;dur={(time.perf_counter() - began) * 1000:.2f}"
        return response

    async def start(request: Request) -> Response:
        return await respond(request, 201, service.start)

    async def answer(request: Request, handler: Any, pattern: re.Pattern[str],
                     form: str) -> Response:
        challenge_id = request.path_params["challenge_id"]
        if not pattern.match(challenge_id):
            return problem_response(problem("challenge-unknown",
                                            f"challenge id must be {form}"),
                                    request.url.path)
        return await respond(request, 200, handler, challenge_id)

    async def complete(request: Request) -> Response:
        return await answer(request, service.complete, CHALLENGE_ID, "32 hex digits")

    async def device_challenge(request: Request) -> Response:
        return await respond(request, 201, lifecycle.challenge, verifies=False)

    async def renew(request: Request) -> Response:
        return await answer(request, lifecycle.renew, SEALED_ID, SEALED_ID_FORM)

    async def decommission(request: Request) -> Response:
        return await answer(request, lifecycle.decommission, SEALED_ID, SEALED_ID_FORM)

    async def crl(_request: Request) -> Response:
        der = await run_in_threadpool(lifecycle.crl_der)
        return Response(der, media_type=CRL_CONTENT_TYPE,
                        headers={"Cache-Control": "max-age=60"})

    issuing_der = lifecycle.ca.issuing.public_bytes(serialization.Encoding.DER)

    async def ca_issuers(_request: Request) -> Response:
        # RFC 5280 4.2.2.1: caIssuers over HTTP is a DER certificate (application/pkix-cert).
        return Response(issuing_der, media_type=CA_CERT_CONTENT_TYPE,
                        headers={"Cache-Control": "max-age=86400"})

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code,
                                                                  "malformed-request")
        p = problem(code, f"{request.method} {request.url.path}: {exc.detail}")
        p.status = exc.status_code
        # RFC 9110 15.5.6: a 405 lists the methods the resource takes (Starlette says, from
        # a set: sorted here so that the header is the same on every run).
        headers = dict(exc.headers or {})
        if "Allow" in headers:
            headers["Allow"] = ", ".join(sorted(m.strip() for m in headers["Allow"].split(",")))
        return problem_response(p, request.url.path, headers)

    async def crash(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error handling %s %s", request.method, request.url.path,
                      exc_info=exc)
        return problem_response(problem("internal-error", "unexpected error; see the "
                                                          "registrar log"), request.url.path)

    return Starlette(
        routes=[
            Route(f"{API_PREFIX}/health", health, methods=["GET"]),
            Route(f"{API_PREFIX}/enrollments", start, methods=["POST"]),
            Route(f"{API_PREFIX}/enrollments/{{challenge_id}}/complete", complete,
                  methods=["POST"]),
            Route(f"{API_PREFIX}/challenges", device_challenge, methods=["POST"]),
            Route(f"{API_PREFIX}/challenges/{{challenge_id}}/renew", renew, methods=["POST"]),
            Route(f"{API_PREFIX}/challenges/{{challenge_id}}/decommission", decommission,
                  methods=["POST"]),
            Route(CRL_PATH, crl, methods=["GET"]),
            Route(CA_ISSUERS_PATH, ca_issuers, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: crash},
    )
