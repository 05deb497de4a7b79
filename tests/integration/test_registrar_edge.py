"""The registrar's connection edge under idle and slow clients, on loopback: 2,000 idle
TLS connections and 200 slowloris connections while an honest gateway enrolls and
renews; the registrar's memory stays bounded and its log quiet."""

from __future__ import annotations

import contextlib
import resource
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests
from gateway import Gateway
from stack import enrollment_toml, rotation_toml

IDLE = 2000
SLOW = 200
SETTINGS = {"max_connections": "256", "request_timeout": '"3s"', "handshake_timeout": '"2s"',
            "renewal_window": '"0s"'}


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(autouse=True)
def descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < IDLE + 512:
        pytest.skip(f"the hard descriptor limit ({hard}) is below {IDLE + 512}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def _connections(registrar, count: int, first_bytes: bytes = b"") -> Iterator[list]:
    """`count` TLS connections to the registrar, each having sent `first_bytes`."""
    context = ssl.create_default_context(cafile=str(registrar.ca))
    opened: list[ssl.SSLSocket] = []
    try:
        for _ in range(count):
            raw = socket.create_connection(("127.0.0.1", registrar.port), timeout=10)
            try:
                tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
                if first_bytes:
                    tls.sendall(first_bytes)
            except OSError:
                raw.close()  # closed by the edge already (evicted): that is fine
                continue
            opened.append(tls)
        yield opened
    finally:
        for tls in opened:
            tls.close()


def _closed_by_server(tls: ssl.SSLSocket) -> bool:
    try:
        tls.settimeout(0.05)
        return tls.recv(1) == b""
    except (TimeoutError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True


def _honest_work(registrar, newcomer, agent, tmp_path, name: str) -> None:
    health = requests.get(f"{registrar.url}/v1/health", verify=str(registrar.ca), timeout=10)
    assert health.status_code == 200
    gw = Gateway(newcomer.tcti, tmp_path / name, registrar.url, registrar.ca)
    try:
        assert gw.enroll(registrar.token()).device_id
    finally:
        gw.close()
    code, renewed = agent.ctl_json("renew", "--wait")
    assert code == 0 and renewed["outcome"]["result"] == "renewed", renewed


def test_idle_and_slow_connections_do_not_lock_honest_gateways_out(tpm_factory,
                                                                  registrar_factory,
                                                                  agent_factory, tmp_path):
    tpm, *newcomers = tpm_factory(), tpm_factory(), tpm_factory()
    registrar = registrar_factory([t.vendor_ca for t in (tpm, *newcomers)], settings=SETTINGS)
    agent = agent_factory(tpm, extra=enrollment_toml(registrar, registrar.token())
                          + rotation_toml())
    agent.wait_generation(1)
    assert registrar.proc is not None
    pid = registrar.proc.pid
    baseline = _rss_mib(pid)

    # 2,000 idle TLS clients: the edge keeps at most max_connections, the oldest idle
    # ones make room, and the honest gateway gets in.
    with _connections(registrar, IDLE) as idle:
        _honest_work(registrar, newcomers[0], agent, tmp_path, "during-idle")
        peak = _rss_mib(pid)
        still_open = sum(not _closed_by_server(c) for c in idle)
        assert still_open <= 256, still_open

    # 200 slowloris clients trickling a request head: closed after request_timeout.
    head = b"POST /v1/enrollments HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    with _connections(registrar, SLOW, head) as slow:
        _honest_work(registrar, newcomers[1], agent, tmp_path, "during-slow")
        deadline = time.monotonic() + 30  # request_timeout is 3 s: generous, bounded
        remaining = list(slow)
        while remaining and time.monotonic() < deadline:
            for tls in remaining:
                with contextlib.suppress(OSError):
                    tls.sendall(b"a")  # a byte at a time, as slowloris does
            remaining = [t for t in remaining if not _closed_by_server(t)]
            time.sleep(0.5)
        assert not remaining, f"{len(remaining)} slow connections still open"

    time.sleep(1)
    after = _rss_mib(pid)
    log = registrar.log_path.read_text()
    print(f"registrar RSS: baseline {baseline:.0f} MiB, peak {peak:.0f} MiB, "
          f"after {after:.0f} MiB")
    assert peak - baseline < 200, (baseline, peak)  # bounded by max_connections
    assert after - baseline < 32, (baseline, after)  # handed back (malloc_trim)
    assert "Traceback" not in log, log[-3000:]
    warnings = [line for line in log.splitlines() if "connection" in line and "WARNING" in line]
    assert len(warnings) <= 4, warnings  # rate-limited: one a minute per kind
    assert registrar.proc.poll() is None
