"""The aiohttp application: routes, bearer-token auth, the response envelope.

Every answer is ``{"success", "errors": [{"code", "message"}], "messages",
"result"}`` (the Cloudflare v4 envelope). Routes exist both at the root and
under ``/client/v4`` so a script written for ``api.cloudflare.com/client/v4``
only changes its host. ``/healthz`` and ``/openapi.json`` need no token (probes
and tooling); everything else answers 401 without a valid one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from control.api.handlers import Api, parse_validate_only
from control.api.validation import ApiError, BadRequest, Forbidden, NotFound, Unauthorized
from control.metrics import ControlMetrics
from control.secrets import hash_token
from control.store import TokenInfo

log = logging.getLogger("anywan.control.api")

PREFIXES = ("", "/client/v4")
MESSAGE_CODE = 1100

API_KEY: web.AppKey[Api] = web.AppKey("api", Api)
METRICS_KEY: web.AppKey[ControlMetrics] = web.AppKey("metrics", ControlMetrics)
OPENAPI_KEY: web.AppKey[dict[str, Any]] = web.AppKey("openapi", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def envelope(
    result: Any,
    *,
    status: int = 200,
    errors: list[dict[str, Any]] | None = None,
    messages: list[str] | None = None,
) -> web.Response:
    body = {
        "success": not errors,
        "errors": errors or [],
        "messages": [{"code": MESSAGE_CODE, "message": m} for m in messages or []],
        "result": result,
    }
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, sort_keys=True))


def _route_label(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None or (isinstance(info, web.UrlMappingMatchInfo) and info.http_exception):
        return "unmatched"
    return str(resource.canonical)


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    try:
        resp = await handler(request)
    except ApiError as exc:
        resp = envelope(
            None, status=exc.status, errors=[{"code": exc.code, "message": exc.message}]
        )
    except web.HTTPException as exc:
        if exc.status == 405:
            msg = f"method {request.method} not allowed here"
        elif exc.status == 404:
            msg = "no such API route"
        else:
            msg = exc.reason
        resp = envelope(
            None, status=exc.status, errors=[{"code": 1000 + exc.status, "message": msg}]
        )
    except Exception as exc:  # one place turns bugs into a 500 with no details
        log.error(
            "internal error on %s %s: %s", request.method, _route_label(request), type(exc).__name__
        )
        resp = envelope(None, status=500, errors=[{"code": 1500, "message": "internal error"}])
    metrics.api_requests.labels(_route_label(request), request.method, str(resp.status)).inc()
    return resp


def authenticate(request: web.Request) -> TokenInfo:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    info = request.app[API_KEY].store.find_token(hash_token(token.strip()))
    if info is None:
        raise Unauthorized("invalid API token")
    return info


async def read_json(request: web.Request) -> Any:
    if not request.body_exists:
        raise BadRequest("body: a JSON body is required")
    try:
        return await request.json(loads=json.loads)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an int of > 4300 digits
        raise BadRequest("body: not valid JSON") from None
    except RecursionError:
        raise BadRequest("body: JSON nested too deeply") from None


def _vo(request: web.Request) -> bool:
    return parse_validate_only(request.query.get("validate_only"))


def _kind_handlers(kind: str) -> dict[str, Handler]:
    async def list_(request: web.Request) -> web.Response:
        api, tok = request.app[API_KEY], authenticate(request)
        return envelope(api.list_all(tok, kind, request.match_info["account_id"]))

    async def create(request: web.Request) -> web.Response:
        api, tok = request.app[API_KEY], authenticate(request)
        vo = _vo(request)
        body = await read_json(request)
        msgs: list[str] = []
        res = api.create(
            tok, kind, request.match_info["account_id"], body, validate_only=vo, messages=msgs
        )
        return envelope(res, messages=msgs)

    async def get(request: web.Request) -> web.Response:
        api, tok = request.app[API_KEY], authenticate(request)
        m = request.match_info
        return envelope(api.get(tok, kind, m["account_id"], m["id"]))

    async def update(request: web.Request) -> web.Response:
        api, tok = request.app[API_KEY], authenticate(request)
        vo = _vo(request)
        body = await read_json(request)
        m, msgs = request.match_info, list[str]()
        res = api.update(tok, kind, m["account_id"], m["id"], body, validate_only=vo, messages=msgs)
        return envelope(res, messages=msgs)

    async def delete(request: web.Request) -> web.Response:
        api, tok = request.app[API_KEY], authenticate(request)
        m = request.match_info
        return envelope(api.delete(tok, kind, m["account_id"], m["id"], validate_only=_vo(request)))

    return {"list": list_, "create": create, "get": get, "update": update, "delete": delete}


async def psk_generate(request: web.Request) -> web.Response:
    api, tok = request.app[API_KEY], authenticate(request)
    m, msgs = request.match_info, list[str]()
    res = api.psk_generate(tok, m["account_id"], m["id"], validate_only=_vo(request), messages=msgs)
    return envelope(res, messages=msgs)


async def sas(request: web.Request) -> web.Response:
    api, tok = request.app[API_KEY], authenticate(request)
    m = request.match_info
    return envelope(api.sas(tok, m["account_id"], m["id"]))


async def accounts(request: web.Request) -> web.Response:
    api, tok = request.app[API_KEY], authenticate(request)
    return envelope({"accounts": api.accounts(tok)})


async def workers(request: web.Request) -> web.Response:
    api, tok = request.app[API_KEY], authenticate(request)
    return envelope(api.workers(tok))


HEALTH_CODE = 1503
"""Error code of each problem of a degraded ``/healthz``."""


async def healthz(request: web.Request) -> web.Response:
    """200 when control is "ok"; 503 when "degraded", so probes and load
    balancers need no body parsing. The result is the full health either
    way; a degraded answer also lists each problem as an error (``success``
    false), as any other failed call of the envelope does."""
    health = request.app[API_KEY].hooks.health()
    if health.get("status") == "ok":
        return envelope(health)
    problems = health.get("problems") or ["unhealthy"]
    errors = [{"code": HEALTH_CODE, "message": str(p)} for p in problems]
    return envelope(health, status=503, errors=errors)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI_KEY])


async def metrics_handler(request: web.Request) -> web.Response:
    tok = authenticate(request)
    if not tok.is_operator:
        raise Forbidden("/metrics needs an operator token")
    return metrics_response(request.app[METRICS_KEY])


def metrics_response(metrics: ControlMetrics) -> web.Response:
    resp = web.Response(body=metrics.render())
    resp.content_type = "text/plain"
    resp.charset = "utf-8"
    return resp


async def not_found(request: web.Request) -> web.Response:
    raise NotFound("no such API route")


def create_app(api: Api, metrics: ControlMetrics, openapi_doc: dict[str, Any]) -> web.Application:
    app = web.Application(middlewares=[envelope_middleware], client_max_size=1 << 20)
    app[API_KEY] = api
    app[METRICS_KEY] = metrics
    app[OPENAPI_KEY] = openapi_doc
    for prefix in PREFIXES:
        acct = prefix + "/accounts/{account_id}/magic"
        for kind, plural in (
            ("ipsec", "ipsec_tunnels"),
            ("gre", "gre_tunnels"),
            ("route", "routes"),
        ):
            h = _kind_handlers(kind)
            app.router.add_get(f"{acct}/{plural}", h["list"], allow_head=False)
            app.router.add_post(f"{acct}/{plural}", h["create"])
            app.router.add_get(f"{acct}/{plural}/{{id}}", h["get"], allow_head=False)
            app.router.add_put(f"{acct}/{plural}/{{id}}", h["update"])
            app.router.add_delete(f"{acct}/{plural}/{{id}}", h["delete"])
        app.router.add_post(f"{acct}/ipsec_tunnels/{{id}}/psk_generate", psk_generate)
        app.router.add_get(f"{acct}/ipsec_tunnels/{{id}}/sas", sas, allow_head=False)
        app.router.add_get(prefix + "/accounts", accounts, allow_head=False)
        app.router.add_get(prefix + "/workers", workers, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/openapi.json", openapi, allow_head=False)
    app.router.add_get("/metrics", metrics_handler, allow_head=False)
    return app
