"""A lean HTTP/1.1 client for the load generators (httptools, one keep-alive connection per client), so that
the load itself takes as little CPU as it can from the engines and the proxies it measures."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httptools


class _Parsed:
    def __init__(self, on_body: Callable[[bytes], None]) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.complete = False
        self.on_body = on_body

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_message_complete(self) -> None:
        self.complete = True


class Http1Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str],
                   on_body: Callable[[bytes], None]) -> tuple[int, dict[bytes, bytes]]:
        """POST and read the response through, handing each piece of its body to `on_body` as it is parsed;
        returns the status and the headers (names lower-cased). Reconnects after a close."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None and self.writer is not None
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.writer.write(head.encode() + body)
        parsed = _Parsed(on_body)
        parser = httptools.HttpResponseParser(parsed)
        try:
            while not parsed.complete:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("closed by the server")
                parser.feed_data(data)
        except Exception:
            self.close()
            raise
        if not parser.should_keep_alive():
            self.close()
        return parser.get_status_code(), parsed.headers

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
