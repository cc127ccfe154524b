"""Minimal asyncio WebSocket and HTTP/1.1 clients for the load generator.

A general-purpose client library spends several times the server's CPU per
frame, which would make the load generator the bottleneck. This one does only
what the benchmark needs: the upgrade request, masked client frames, a frame
parser, ping/pong and close. It runs as a plain `asyncio.Protocol` on uvloop.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from typing import cast

try:  # C helper shipped with the `websockets` package; pure Python fallback below.
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover
    _apply_mask = None

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"


def mask(data: bytes, key: bytes) -> bytes:
    if _apply_mask is not None:
        return _apply_mask(data, key)
    n = len(data)
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ k).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    key = random.getrandbits(32).to_bytes(4, "big")
    return header + key + mask(payload, key)


class UpgradeRefused(ConnectionError):
    """The server answered the upgrade with another status than 101 (e.g. 503: too many connections)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class WsClient(asyncio.Protocol):
    """One client WebSocket. `on_message(data)` gets every text/binary message."""

    def __init__(self, on_message: Callable[[bytes], None] | None = None) -> None:
        self.on_message = on_message or (lambda data: None)
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # an incomplete frame (or the handshake) carried to the next read
        self.out: list[bytes] = []
        self.upgraded = False
        self.deflate_accepted = False
        self.inflater: zlib._Decompress | None = None
        self.fragments: list[bytes] = []
        self.fragment_compressed = False
        self.close_code: int | None = None  # set when the server closed (1006 = no close frame)
        self.left = False  # closed on purpose by its user: not a failure
        self.pings = 0  # pings answered
        self.connected_t = self.upgraded_t = 0.0  # monotonic: TCP connection made; 101 received
        self.ping_t = 0.0  # monotonic time the last one was answered
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.connected_t = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None:
            self.close_code = 1006
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.buf += data
            if not self._parse_handshake():
                return
            data = bytes(self.buf)
            self.buf.clear()
        elif self.buf:
            self.buf += data
            data = bytes(self.buf)
            self.buf.clear()
        self._parse_frames(data)

    # --- sending ---

    def send(self, data: bytes, opcode: int = OP_TEXT) -> None:
        """Queue a frame; frames queued in one loop iteration go out in one write (one syscall)."""
        self.out.append(encode_frame(opcode, data))
        if len(self.out) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def close(self, code: int = 1000) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.write(encode_frame(OP_CLOSE, struct.pack("!H", code)))
            self.transport.close()

    # --- parsing ---

    def _parse_handshake(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[: end + 4]
        if not head[0].startswith("HTTP/1.1 101"):
            parts = head[0].split()
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.handshake.set_exception(UpgradeRefused(status, f"upgrade refused: {head[0]}"))
            assert self.transport is not None
            self.transport.close()
            return False
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-extensions" and "permessage-deflate" in value:
                self.deflate_accepted = True
                self.inflater = zlib.decompressobj(-15)
        self.upgraded = True
        self.upgraded_t = time.monotonic()
        self.handshake.set_result(None)
        return True

    def _parse_frames(self, buf: bytes) -> None:
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, hdr = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, hdr = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, hdr = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + hdr + length  # server frames are never masked
            if end > n:
                break
            payload = buf[pos + hdr : end]
            pos = end
            self._frame(b0, payload)
        if pos < n:
            self.buf += buf[pos:]

    def _frame(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if opcode == OP_PING:
            # Answered at once, in stream order, not coalesced: a pong confirms every frame before the ping
            # (the gateway's offline delivery counts a frame as delivered only then), so it must not wait.
            assert self.transport is not None
            self.pings += 1
            self.ping_t = time.monotonic()
            self.transport.write(encode_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.close(self.close_code if self.close_code not in (1005, 1006) else 1000)
        elif opcode == OP_PONG:
            pass
        elif b0 & 0x80 and opcode and not b0 & 0x40:  # fast path: whole uncompressed message
            self.on_message(payload)
        else:
            if opcode:
                self.fragment_compressed = bool(b0 & 0x40)
            self.fragments.append(payload)
            if b0 & 0x80:
                data = b"".join(self.fragments)
                self.fragments = []
                if self.fragment_compressed and self.inflater is not None:
                    data = self.inflater.decompress(data + b"\x00\x00\xff\xff")
                self.on_message(data)


async def ws_connect(
    host: str,
    port: int,
    path: str = "/gateway",
    *,
    on_message: Callable[[bytes], None] | None = None,
    offer_deflate: bool = False,
    timeout: float = 30.0,
    headers: Sequence[tuple[str, str]] = (),
) -> WsClient:
    """Connect and upgrade; `headers` are extra request header lines (e.g. `X-Forwarded-For`).
    A refused upgrade (e.g. 503) raises `UpgradeRefused` with the status."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, client = await loop.create_connection(lambda: WsClient(on_message), host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if offer_deflate:
            lines.append(f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}")
        lines += [f"{name}: {value}" for name, value in headers]
        assert client.transport is not None
        client.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            await client.handshake
        except BaseException:
            client.transport.close()
            raise
    return client


class HttpClient:
    """HTTP/1.1 keep-alive client: one request at a time; Content-Length or chunked bodies (the
    reference Node gateway answers `res.writeHead(...); res.end(body)`: chunked)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length, close, chunked = 0, False, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and "close" in value.lower():
                close = True
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        data = await self._chunked(self.reader) if chunked else await self.reader.readexactly(length)
        if close:
            await self.aclose()
        return status, data

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader, limit: int = 1 << 24) -> bytes:
        """A chunked body: `size-in-hex[;ext]` CRLF, data CRLF, ..., `0` CRLF, trailers, CRLF."""
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                for _ in range(100):  # trailers, if any, up to the empty line
                    if await reader.readuntil(b"\r\n") == b"\r\n":
                        return bytes(body)
                raise ValueError("more than 100 trailer lines")
            if len(body) + size > limit:
                raise ValueError(f"chunked body over {limit} bytes")
            body += await reader.readexactly(size)
            await reader.readexactly(2)  # CRLF after the chunk

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
