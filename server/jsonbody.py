"""Reading request bodies as strict JSON: UTF-8, finite numbers only, bounded nesting.

Python's ``json`` accepts ``NaN``/``Infinity`` literals, turns ``1e309`` into infinity, and fails
with a ``RecursionError`` on deep nesting; FastAPI turns the last (and invalid UTF-8) into a 400
with no reason. :class:`StrictJSONRoute` makes every route read its body through
:func:`parse_json`, which refuses all of these with a message that says what is wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from server.errors import MalformedJSON

MAX_DEPTH = 64  # no request body of this API nests deeper than a few levels


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedJSON(f"malformed JSON body: the number {text[:40]} is out of range (finite numbers only)")
    return value


def _no_constant(name: str) -> Any:
    raise MalformedJSON(f"malformed JSON body: {name} is not a JSON value (finite numbers only)")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (iterative: safe on any input the parser produced)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(body: bytes) -> Any:
    """The JSON value of ``body``; :class:`MalformedJSON` (400) for anything but strict JSON.
    Syntax errors raise ``json.JSONDecodeError`` (FastAPI reports them with the position)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJSON(f"malformed JSON body: not valid UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise MalformedJSON(f"malformed JSON body: nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # e.g. an integer literal with more digits than Python converts
        raise MalformedJSON(f"malformed JSON body: {exc}") from None
    if _depth(value) > MAX_DEPTH:
        raise MalformedJSON(f"malformed JSON body: nested more than {MAX_DEPTH} levels deep")
    return value


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """An ``APIRoute`` whose handler reads the body with :func:`parse_json`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
