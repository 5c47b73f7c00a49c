"""The gateway's own HTTP/1.1 client to the engines, against a small asyncio server."""

from __future__ import annotations

import asyncio

import pytest

from serving.gateway.upstream import Endpoint, UpstreamError, UpstreamPool, UpstreamRefused


class Server:
    """Answers every request with a chunked body in three pieces; counts connections."""

    def __init__(self, *, close_after_response: bool = False, die_mid_body: bool = False) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.close_after_response = close_after_response
        self.die_mid_body = die_mid_body
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                for piece in (b"data: 1\n\n", b"data: 2\n\n"):
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                    await asyncio.sleep(0.01)
                if self.die_mid_body:
                    writer.transport.abort()
                    return
                writer.write(b"9\r\ndata: 3\n\n\r\n0\r\n\r\n")
                await writer.drain()
                if self.close_after_response:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return


async def serve(server: Server) -> tuple[asyncio.AbstractServer, Endpoint]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    return listener, Endpoint(f"http://127.0.0.1:{port}/prefix")


async def call(pool: UpstreamPool, endpoint: Endpoint) -> tuple[int, list[bytes]]:
    response = await pool.request(endpoint, "POST", "/v1/completions", body=b'{"x":1}', headers=("X-A: b",))
    try:
        return response.status, [chunk async for chunk in response.chunks()]
    finally:
        response.close()


def test_streams_bodies_and_reuses_the_connection() -> None:
    async def scenario() -> None:
        server = Server()
        listener, endpoint = await serve(server)
        pool = UpstreamPool(connect_timeout_s=2, read_timeout_s=5)
        for _ in range(3):
            status, chunks = await call(pool, endpoint)
            assert status == 200
            assert b"".join(chunks) == b"data: 1\n\ndata: 2\n\ndata: 3\n\n"
            assert len(chunks) >= 2  # handed on as they came, not at the end
        assert server.connections == 1
        request = server.requests[0]
        assert request.startswith(b"POST /prefix/v1/completions HTTP/1.1\r\n")
        assert b"\r\nX-A: b\r\n" in request and request.endswith(b'{"x":1}')
        await pool.aclose()
        listener.close()

    asyncio.run(scenario())


def test_a_connection_the_engine_closed_is_replaced() -> None:
    async def scenario() -> None:
        server = Server(close_after_response=True)
        listener, endpoint = await serve(server)
        pool = UpstreamPool(connect_timeout_s=2, read_timeout_s=5)
        for _ in range(3):
            assert (await call(pool, endpoint))[0] == 200
            await asyncio.sleep(0.05)
        assert server.connections == 3
        await pool.aclose()
        listener.close()

    asyncio.run(scenario())


def test_refused_and_broken_engines() -> None:
    async def scenario() -> None:
        pool = UpstreamPool(connect_timeout_s=2, read_timeout_s=5)
        listener, endpoint = await serve(Server())
        listener.close()
        await listener.wait_closed()
        with pytest.raises(UpstreamRefused):
            await call(pool, endpoint)

        server = Server(die_mid_body=True)
        listener, endpoint = await serve(server)
        response = await pool.request(endpoint, "POST", "/v1/completions", body=b"{}")
        seen = []
        with pytest.raises(UpstreamError):
            async for chunk in response.chunks():
                seen.append(chunk)
        assert b"".join(seen) == b"data: 1\n\ndata: 2\n\n"
        response.close()
        listener.close()

    asyncio.run(scenario())


def test_a_silent_engine_times_out() -> None:
    async def scenario() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(5)

        listener = await asyncio.start_server(silent, "127.0.0.1", 0)
        endpoint = Endpoint(f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}")
        pool = UpstreamPool(connect_timeout_s=2, read_timeout_s=0.2)
        with pytest.raises(UpstreamError, match="no data from the engine"):
            await pool.request(endpoint, "POST", "/v1/completions", body=b"{}")
        listener.close()

    asyncio.run(scenario())
