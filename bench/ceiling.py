"""The ceiling: the thinnest relay possible on the gateway's own stack.

A raw ASGI app under the same uvicorn settings as gateway.py (uvloop,
httptools, no per-message deflate, same max size and ping settings). It reads
`type` / `targetMeshId`, and forwards the payload bytes untouched in a
`gateway_incoming` frame: no validation, no sanitizing, no auth check, no
rate limit, no acks. The benchmark reports the gateway as a fraction of this.

    python bench/ceiling.py --port 4000 [--ws websockets-sansio|websockets|wsproto]
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

WS_IMPLS = ("websockets-sansio", "websockets", "wsproto")
WS_MAX_BYTES = 1_048_576  # gateway default WS_MAX_BYTES
PING_S = 20.0  # gateway default PING_INTERVAL_S / PING_TIMEOUT_S


class Frame(msgspec.Struct):
    type: str
    meshId: str = ""
    targetMeshId: str = ""
    payload: msgspec.Raw = msgspec.Raw(b"null")  # never decoded: forwarded as bytes


class Incoming(msgspec.Struct, tag="gateway_incoming", tag_field="type"):
    fromMeshId: str
    fromMeshName: str
    payload: msgspec.Raw


decode_frame = msgspec.json.Decoder(Frame).decode
encode = msgspec.json.Encoder().encode


def create_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    peers: dict[str, Send] = {}

    async def http(scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:  # drain the body; /register is answered without storing anything
            more = (await receive()).get("more_body", False)
        status, body = 404, b'{"error":"not found"}'
        if scope["path"] == "/register" and scope["method"] == "POST":
            status, body = 200, b'{"ok":true}'
        elif scope["path"] == "/health":
            status, body = 200, encode({"ok": True, "connected": len(peers)})
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def forward(target: Send, text: str) -> None:
        try:
            await target({"type": "websocket.send", "text": text})
        except Exception:  # the target went away meanwhile: drop, like any relay would
            logging.getLogger("ceiling").debug("send to a closed peer")

    async def websocket(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        if scope["path"] != "/gateway":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        mesh = ""
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes") or message.get("text") or ""
                try:
                    frame = decode_frame(data)
                except msgspec.DecodeError:
                    continue
                if frame.type == "gateway_auth":
                    mesh = frame.meshId
                    peers[mesh] = send
                    ok = {"type": "gateway_auth_ok", "meshId": mesh, "name": mesh}
                    await send({"type": "websocket.send", "text": encode(ok).decode()})
                elif frame.type == "gateway_relay" and mesh:
                    target = peers.get(frame.targetMeshId)
                    if target is not None:
                        await forward(target, encode(Incoming(mesh, mesh, frame.payload)).decode())
                elif frame.type == "gateway_broadcast" and mesh:
                    text = encode(Incoming(mesh, mesh, frame.payload)).decode()
                    for other, target in list(peers.items()):
                        if other != mesh:
                            await forward(target, text)
        finally:
            if mesh and peers.get(mesh) is send:
                del peers[mesh]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await http(scope, receive, send)
        elif scope["type"] == "websocket":
            await websocket(scope, receive, send)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "4000")))
    parser.add_argument("--ws", choices=WS_IMPLS, default="websockets-sansio")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        ws=args.ws,
        loop="uvloop",
        http="httptools",
        ws_per_message_deflate=False,
        ws_max_size=WS_MAX_BYTES,
        ws_ping_interval=PING_S,
        ws_ping_timeout=PING_S,
        lifespan="off",
        timeout_graceful_shutdown=5,
        backlog=4096,  # as gateway.py: a reconnect storm arrives at once
        server_header=False,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
