"""Run the Eclipse Paho MQTT 3.1.1 interoperability suite, unmodified, over mutual TLS.

``python tests/paho_interop.py --suite DIR --port P --identities DIR --ca ROOT [--prefix P]``
imports the suite's ``client_test`` and changes only what is outside it:

* the ``socket`` module its client uses is replaced by one whose sockets speak TLS with the
  certificate of the device named like the client id of the CONNECT they carry (the handshake
  waits for that first packet); a client id that is not a valid device id (the suite's
  ``clean retained``) is sent as the device id it maps to (``clean-retained``), and the
  zero-length one is sent as is, with ``myclientid``'s certificate;
* its topics get ``--prefix`` (``fleet/broadcast/``, where gold devices may publish and every
  device may subscribe); the topic it expects a subscription to fail on is left as it is.

Every test of ``Test`` runs, and ``will_message_test`` (which unittest does not collect). The
last line printed is a JSON object: test name -> ``passed``, ``failed`` or ``error``.
The suite reads and writes one socket from two threads: each TLS socket serialises its SSL
calls with a lock that is never held while waiting for the network.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import select
import socket as _socket
import ssl
import sys
import threading
import time
import types
import unittest
from pathlib import Path
from typing import Any

_DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ZERO_LENGTH_STAND_IN = "myclientid"  # whose certificate the zero-length client id shows


def device_id_for(client_id: str) -> str:
    """The device whose certificate a client id connects with."""
    if not client_id:
        return ZERO_LENGTH_STAND_IN
    if _DEVICE_ID.fullmatch(client_id):
        return client_id
    return re.sub(r"[^a-z0-9._-]+", "-", client_id.lower()).strip("-")


def _remaining_length(data: bytes, start: int) -> tuple[int, int]:
    value, shift, index = 0, 0, start
    while True:
        byte = data[index]
        value += (byte & 0x7F) << shift
        index += 1
        if not byte & 0x80:
            return value, index
        shift += 7


def _encode_length(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def split_connect(data: bytes) -> tuple[str, bytes, bytes] | None:
    """(client id, the CONNECT sent as that device, what follows it) once ``data`` holds a
    whole CONNECT; None while it does not."""
    if len(data) < 2:
        return None
    try:
        length, body_start = _remaining_length(data, 1)
    except IndexError:
        return None
    end = body_start + length
    if len(data) < end:
        return None
    body = data[body_start:end]
    name_length = int.from_bytes(body[0:2], "big")
    payload_start = 2 + name_length + 4  # protocol name, level, flags, keep alive
    id_length = int.from_bytes(body[payload_start : payload_start + 2], "big")
    client_id = body[payload_start + 2 : payload_start + 2 + id_length].decode("utf-8")
    device_id = device_id_for(client_id)
    sent_id = client_id if not client_id else device_id
    new_body = (
        body[:payload_start]
        + len(sent_id.encode()).to_bytes(2, "big")
        + sent_id.encode()
        + body[payload_start + 2 + id_length :]
    )
    packet = data[:1] + _encode_length(len(new_body)) + new_body
    return client_id, packet, data[end:]


class TlsClientSocket:
    """What the suite's client takes for a TCP socket: TLS as the device of its client id."""

    identities: Path
    ca: Path
    server_name = "localhost"

    def __init__(self, family: int = _socket.AF_INET, kind: int = _socket.SOCK_STREAM) -> None:
        self._raw = _socket.socket(family, kind)
        self._tls: ssl.SSLSocket | None = None
        self._lock = threading.Lock()
        self._timeout: float | None = None
        self._pending = b""
        self._closed = False

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def connect(self, address: tuple[str, int]) -> None:
        self._raw.settimeout(10)
        self._raw.connect(address)

    def _handshake(self, device_id: str) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(self.ca))
        directory = self.identities / device_id
        context.load_cert_chain(str(directory / "cert.pem"), str(directory / "key.pem"))
        tls = context.wrap_socket(self._raw, server_hostname=self.server_name)
        tls.setblocking(False)
        self._tls = tls

    def send(self, data: bytes) -> int:
        if self._tls is None:
            self._pending += data
            split = split_connect(self._pending)
            if split is None:
                return len(data)
            client_id, connect, rest = split
            self._pending = b""
            self._handshake(device_id_for(client_id))
            self._send_all(connect + rest)
            return len(data)
        self._send_all(data)
        return len(data)

    def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            with self._lock:
                tls = self._live()
                try:
                    sent = tls.send(view)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    sent = 0
            view = view[sent:]
            if view:
                select.select([], [tls], [], 0.05)

    def recv(self, size: int) -> bytes:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            with self._lock:
                tls = self._live()
                try:
                    return tls.recv(size)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            wait = 0.05
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")
                wait = min(wait, left)
            try:
                select.select([tls], [], [], wait)
            except (OSError, ValueError):
                raise OSError("socket closed") from None

    def _live(self) -> ssl.SSLSocket:
        if self._closed or self._tls is None:
            raise OSError("socket closed")
        return self._tls

    def shutdown(self, how: int) -> None:
        with self._lock, contextlib.suppress(OSError):
            (self._tls or self._raw).shutdown(how)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            (self._tls or self._raw).close()


def _socket_module() -> types.ModuleType:
    """The real socket module, but whose ``socket`` is :class:`TlsClientSocket`."""
    module = types.ModuleType("socket")
    module.__dict__.update(_socket.__dict__)
    vars(module)["socket"] = TlsClientSocket
    return module


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--identities", type=Path, required=True, help="DIR/<device id>/")
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--prefix", default="fleet/broadcast/")
    args = parser.parse_args()

    TlsClientSocket.identities, TlsClientSocket.ca = args.identities, args.ca
    sys.path.insert(0, str(args.suite))
    client_test = importlib.import_module("client_test")  # the suite, unmodified
    client_main = importlib.import_module("mqtt.clients.V311.main")  # the suite's client
    vars(client_main)["socket"] = _socket_module()
    suite_globals: dict[str, Any] = vars(client_test)
    suite_globals["host"], suite_globals["port"] = args.host, args.port
    base_topics = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
    base_wild = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")
    suite_globals["topics"] = tuple(args.prefix + t for t in base_topics)
    suite_globals["wildtopics"] = tuple(args.prefix + t for t in base_wild)
    suite_globals["nosubscribe_topics"] = ("test/nosubscribe",)

    tests = unittest.TestLoader().loadTestsFromTestCase(client_test.Test)
    tests.addTest(client_test.Test("will_message_test"))
    names = [_name(test) for test in _each(tests)]  # a run empties the suite
    runner = unittest.TextTestRunner(verbosity=2, stream=sys.stdout, resultclass=_Verdicts)
    result = runner.run(tests)
    assert isinstance(result, _Verdicts)
    verdicts = dict.fromkeys(names, "not run") | result.verdicts
    sys.stdout.flush()
    print(json.dumps(verdicts, sort_keys=True), flush=True)
    return 0


class _Verdicts(unittest.TextTestResult):
    """Each test's verdict by name; a class-level error (setUpClass) under its own name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.verdicts: dict[str, str] = {}

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self.verdicts[_name(test)] = "passed"

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self.verdicts[_name(test)] = "failed"

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)
        self.verdicts[_name(test)] = "error"


def _name(test: unittest.TestCase) -> str:
    return test.id().rsplit(".", 1)[-1] if "." in test.id() else str(test)


def _each(suite: unittest.TestSuite) -> list[unittest.TestCase]:
    out: list[unittest.TestCase] = []
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            out.extend(_each(item))
        else:
            out.append(item)
    return out


if __name__ == "__main__":
    sys.exit(main())
