"""Browser POST uploads (HTML form with a signed policy): placeholder until
the form parser lands."""

from __future__ import annotations

from aiohttp import web

from gateway import errors
from gateway.handlers.common import Ctx
from gateway.request import S3Request


async def post_object(ctx: Ctx, req: S3Request) -> web.StreamResponse:
    raise errors.NotImplemented("POST object is not implemented yet")
