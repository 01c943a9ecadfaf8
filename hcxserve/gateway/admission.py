"""Admission control: a bounded number of chat requests in progress per gateway worker and a bounded queue in
front of them; beyond both, a request is refused at once with 429 and `Retry-After` instead of piling up until
everything times out. A streamed response holds its slot until its last event."""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from hcxserve.protocol.errors import OverloadedError


class Admission:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_concurrent: int,
        max_queued: int,
        retry_after_s: int,
        suffix: str = "/chat/completions",
    ) -> None:
        self.app = app
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.suffix = suffix
        self.slots = asyncio.Semaphore(max_concurrent)
        self.waiting = 0

    @property
    def full(self) -> bool:
        return self.slots.locked() and self.waiting >= self.max_queued

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(self.suffix):
            await self.app(scope, receive, send)
            return
        if self.full:
            error = OverloadedError(
                f"The server is at capacity ({self.max_concurrent} requests in progress, {self.max_queued} waiting); "
                f"retry after {self.retry_after_s} s."
            )
            headers = {"Retry-After": str(self.retry_after_s)}
            await JSONResponse(error.to_dict(), status_code=error.status_code, headers=headers)(scope, receive, send)
            return
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release()
