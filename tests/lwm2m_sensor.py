"""An LwM2M client built on aiocoap: it bootstraps, registers with the gateway and
answers the gateway's device management (Read, Write, Execute, Discover) from the same
port, as a sensor does; over OSCORE with the sensor's own credential, or in plain CoAP
behind a DTLS relay (tests/lwm2m_peer.py).

For what lwm2m-node-lib lacks: Bootstrap, TLV and SenML-CBOR answers, Execute,
Discover, and OSCORE. aiocoap does the CoAP and the OSCORE (one
FilesystemSecurityContext for both directions); the objects here are Security (/0),
Server (/1) and OSCORE (/21) for bootstrap, a Device (/3/0) and a Temperature
(/3303/0). The TLV that bootstrap writes is read by its own small reader here, not
by the gateway's code."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import aiocoap
import cbor2
from aiocoap import Code, Message
from aiocoap import resource as coap_resource
from aiocoap.credentials import CredentialsMap
from aiocoap.oscore import FilesystemSecurityContext
from aiocoap.oscore_sitewrapper import OscoreSiteWrapper
from oscore_sensor import write_oscore_secret

T = TypeVar("T")
TLV, SENML_CBOR, TEXT, LINK_FORMAT = 11542, 112, 0, 40
MANUFACTURER = "devid-agent tests"


def _tlv_resource(ident: int, value: bytes) -> bytes:
    assert len(value) < 256
    return bytes([0xC8, ident, len(value)]) + value


class _Device(coap_resource.Resource):
    """/3/0: Read as TLV; Discover (Accept: link format) lists its resources."""

    def __init__(self, sensor: Lwm2mClient) -> None:
        super().__init__()
        self._sensor = sensor

    async def render_get(self, request: Message) -> Message:
        if request.opt.accept == LINK_FORMAT:
            return Message(payload=b"</3/0>,</3/0/0>,</3/0/4>,</3/0/9>",
                           content_format=LINK_FORMAT)
        payload = _tlv_resource(0, MANUFACTURER.encode()) + _tlv_resource(9, bytes([87]))
        return Message(payload=payload, content_format=TLV)


class _Reboot(coap_resource.Resource):
    """/3/0/4: Execute."""

    def __init__(self, sensor: Lwm2mClient) -> None:
        super().__init__()
        self._sensor = sensor

    async def render_post(self, request: Message) -> Message:
        self._sensor.executed.append(request.payload.decode())
        return Message(code=Code.CHANGED)


class _Temperature(coap_resource.ObservableResource):
    """/3303/0/5700: Read as SenML CBOR (as text when asked for text/plain); observable,
    rising 0.5 degrees every 0.3 s while observed."""

    def __init__(self) -> None:
        super().__init__()
        self.value = 21.5
        self._ticking: asyncio.Handle | None = None

    def update_observation_count(self, count: int) -> None:
        if count and self._ticking is None:
            self._ticking = asyncio.get_running_loop().call_later(0.3, self._tick)
        elif not count and self._ticking is not None:
            self._ticking.cancel()
            self._ticking = None

    def _tick(self) -> None:
        self.value += 0.5
        self.updated_state()
        self._ticking = asyncio.get_running_loop().call_later(0.3, self._tick)

    async def render_get(self, request: Message) -> Message:
        if request.opt.accept == 0:  # text/plain asked for: one value as text
            return Message(payload=str(self.value).encode(), content_format=0)
        records = [{-2: "/3303/0/", 0: "5700", 2: self.value}]
        return Message(payload=cbor2.dumps(records), content_format=SENML_CBOR)


class _Text(coap_resource.Resource):
    """A writable string resource (/3303/0/5750, Application Type)."""

    def __init__(self, value: str) -> None:
        super().__init__()
        self.value = value

    async def render_get(self, request: Message) -> Message:
        return Message(payload=self.value.encode(), content_format=TEXT)

    async def render_put(self, request: Message) -> Message:
        if request.opt.content_format not in (None, TEXT):
            return Message(code=Code.UNSUPPORTED_CONTENT_FORMAT)
        self.value = request.payload.decode()
        return Message(code=Code.CHANGED)


def read_tlv(data: bytes) -> dict[int, bytes]:
    """Resource ID -> value bytes of an object instance's TLV (resources only)."""
    out, at = {}, 0
    while at < len(data):
        byte = data[at]
        id_len, len_type = (2 if byte & 0x20 else 1), (byte >> 3) & 3
        ident = int.from_bytes(data[at + 1:at + 1 + id_len], "big")
        at += 1 + id_len
        length = byte & 7 if len_type == 0 else int.from_bytes(data[at:at + len_type], "big")
        at += len_type
        out[ident] = data[at:at + length]
        at += length
    return out


class _Instances(coap_resource.Resource):
    """/0, /1 or /21 as bootstrap sees them: Bootstrap-Delete empties it; Bootstrap-Write
    of /OBJECT/INSTANCE (see `_Instance`) fills it."""

    def __init__(self) -> None:
        super().__init__()
        self.instances: dict[int, dict[int, bytes]] = {}

    async def render_delete(self, request: Message) -> Message:
        self.instances.clear()
        return Message(code=Code.DELETED)


class _Instance(coap_resource.Resource):
    def __init__(self, into: _Instances, instance: int) -> None:
        super().__init__()
        self._into, self._instance = into, instance

    async def render_put(self, request: Message) -> Message:
        if request.opt.content_format != TLV:
            return Message(code=Code.UNSUPPORTED_CONTENT_FORMAT)
        self._into.instances[self._instance] = read_tlv(request.payload)
        return Message(code=Code.CHANGED)


class _BootstrapFinish(coap_resource.Resource):
    def __init__(self, finished: asyncio.Event) -> None:
        super().__init__()
        self._finished = finished

    async def render_post(self, request: Message) -> Message:
        self._finished.set()
        return Message(code=Code.CHANGED)


class _Value(coap_resource.Resource):
    """A read-only resource, as text, from a getter."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self._value = value

    async def render_get(self, request: Message) -> Message:
        return Message(payload=str(self._value()).encode(), content_format=TEXT)


class Firmware:
    """/5/0 (Firmware Update) and /3/0/3 (Firmware Version). A package b"FW:VERSION..."
    updates to VERSION half a second after Update; any other fails (Update Result 8)."""

    def __init__(self) -> None:
        self.version, self.package, self.uri = "1.0.0", b"", ""
        self.state, self.result = 0, 0

    def resources(self) -> dict[tuple[str, ...], coap_resource.Resource]:
        firmware = self

        class Package(coap_resource.Resource):
            async def render_put(self, request: Message) -> Message:
                firmware.package, firmware.state, firmware.result = request.payload, 2, 0
                return Message(code=Code.CHANGED)

        class Uri(coap_resource.Resource):
            async def render_put(self, request: Message) -> Message:
                firmware.uri = request.payload.decode()
                firmware.package, firmware.state, firmware.result = b"FW:" + \
                    firmware.uri.rsplit("/", 1)[-1].encode(), 2, 0  # "fetched"
                return Message(code=Code.CHANGED)

        class Update(coap_resource.Resource):
            async def render_post(self, request: Message) -> Message:
                if firmware.state != 2:
                    return Message(code=Code.METHOD_NOT_ALLOWED)
                firmware.state = 3
                asyncio.get_running_loop().call_later(0.5, firmware.reboot)
                return Message(code=Code.CHANGED)

        return {("5", "0", "0"): Package(), ("5", "0", "1"): Uri(),
                ("5", "0", "2"): Update(), ("5", "0", "3"): _Value(lambda: firmware.state),
                ("5", "0", "5"): _Value(lambda: firmware.result),
                ("3", "0", "3"): _Value(lambda: firmware.version)}

    def reboot(self) -> None:
        if self.package.startswith(b"FW:"):
            self.version = self.package[3:].split(b"\n", 1)[0].decode()
            self.result = 1
        else:
            self.result = 8
        self.state = 0


class Lwm2mClient:
    """Runs its own event loop in a thread; each call blocks until done. `security`: an
    OSCORE context for both directions, or None for plain CoAP (behind a DTLS relay)."""

    def __init__(self, gateway_port: int, security: Any = None) -> None:
        self.gateway = f"coap://127.0.0.1:{gateway_port}"
        self.executed: list[str] = []
        self.application_type = _Text("outdoor")
        self.security_objects, self.server_objects = _Instances(), _Instances()
        self.oscore_objects = _Instances()
        self.firmware = Firmware()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._security = security
        self._finished = self._run(self._event())
        self._context: aiocoap.Context = self._run(self._open())
        self.location: tuple[str, ...] = ()

    @staticmethod
    async def _event() -> asyncio.Event:
        return asyncio.Event()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    async def _open(self) -> aiocoap.Context:
        site = coap_resource.Site()
        site.add_resource(["3", "0"], _Device(self))
        site.add_resource(["3", "0", "4"], _Reboot(self))
        site.add_resource(["3303", "0", "5700"], _Temperature())
        site.add_resource(["3303", "0", "5750"], self.application_type)
        for number, objects in (("0", self.security_objects), ("1", self.server_objects),
                                ("21", self.oscore_objects)):
            site.add_resource([number], objects)
            for instance in range(2):
                site.add_resource([number, str(instance)], _Instance(objects, instance))
        site.add_resource(["bs"], _BootstrapFinish(self._finished))
        for path, resource in self.firmware.resources().items():
            site.add_resource(list(path), resource)
        if self._security is None:
            return await aiocoap.Context.create_server_context(
                site, bind=("127.0.0.1", 0), transports=["udp6"])
        credentials = CredentialsMap()
        credentials[":gateway"] = self._security
        wrapped = OscoreSiteWrapper(site, credentials)
        context = await aiocoap.Context.create_server_context(
            wrapped, bind=("127.0.0.1", 0), transports=["oscore", "udp6"])
        context.client_credentials[self.gateway + "/*"] = self._security
        return context

    @property
    def port(self) -> int:
        """The UDP port it serves on (where a server's requests reach it)."""
        for interface in self._context.request_interfaces:
            transport = getattr(getattr(getattr(interface, "token_interface", None),
                                        "message_interface", None), "transport", None)
            if transport is not None:
                return int(transport.get_extra_info("socket").getsockname()[1])
        raise RuntimeError("no UDP transport")

    def bootstrap(self, endpoint: str, timeout: float = 20.0) -> str:
        """Bootstrap-Request; then waits for the gateway's Bootstrap-Finish (TimeoutError
        if it does not come). The request's code."""
        response = self._run(self._request(Code.POST, "/bs", b"", (f"ep={endpoint}",)))
        if response.code.is_successful():
            self._run(asyncio.wait_for(self._finished.wait(), timeout), timeout + 5)
        return str(response.code)

    def register(self, endpoint: str, lifetime: int = 300, queue: bool = False) -> str:
        query = (f"ep={endpoint}", f"lt={lifetime}", "lwm2m=1.1", "b=U") + \
            (("Q",) if queue else ())
        links = b'</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>,</3303/0>'
        response = self._run(self._request(Code.POST, "/rd", links, query))
        self.location = tuple(response.opt.location_path)
        return str(response.code)

    def update(self) -> str:
        return str(self._run(self._request(Code.POST, "/" + "/".join(self.location), b"",
                                           ())).code)

    async def _request(self, code: Code, path: str, payload: bytes,
                       query: tuple[str, ...]) -> Message:
        message = Message(code=code, payload=payload, uri=self.gateway + path)
        if payload:
            message.opt.content_format = LINK_FORMAT
        message.opt.uri_query = query
        return await self._context.request(message).response

    def close(self) -> None:
        self._run(self._context.shutdown())
        if isinstance(self._security, FilesystemSecurityContext):
            self._security._destroy()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)



def oscore_client(directory: Path, credential: dict[str, str], gateway_port: int
                  ) -> Lwm2mClient:
    """The client over OSCORE with a sensor's minted credential."""
    write_oscore_secret(directory, credential)
    return Lwm2mClient(gateway_port, FilesystemSecurityContext(str(directory)))
