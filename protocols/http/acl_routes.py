"""``/v1/acl``: Consul's token and policy API over the replicated ACL records.

Where records go: policies and tokens in ``global`` (replicated to every
edge), site-local tokens (``"Local": true``) in the site's own scope (at the
hub, the site ``?dc=`` names).

Secrets: a SecretID is returned by bootstrap and token creation only (and by
``/v1/acl/token/self``, which echoes the secret the caller sent). Only its
hash is stored, so reads and lists show ``"SecretID": "<hidden>"``, Consul's
own placeholder for a redacted secret.

These routes check ``acl:read`` / ``acl:write`` themselves; bootstrap needs no
token and works once. Who a request is comes from ``authz.py``.
"""

from __future__ import annotations

import time
import uuid

from konsul.sync import acl
from konsul.sync.acl import (
    ANONYMOUS_ACCESSOR,
    AclPolicy,
    AclRegistry,
    AclToken,
    check_uuid,
)
from konsul.sync.acl_resolver import AclResolver, Principal
from konsul.sync.errors import InvalidArgument, KonsulError, NotFound
from konsul.sync.limits import parse_json_document
from konsul.sync.replica import GLOBAL_SCOPE
from konsul.sync.scope import Scope

from .authz import principal, request_token
from .context import HttpContext
from .request import request
from .responses import Response, json_response
from .router import Routes

acl_api = Routes("acl")

HIDDEN_SECRET = "<hidden>"
# Token features of Consul that Konsul does not have: refused, so nobody
# believes a token carries rights it does not.
_UNSUPPORTED_TOKEN_FIELDS = ("roles", "serviceidentities", "nodeidentities", "templatedpolicies",
                             "expirationtime", "expirationttl", "authmethod")


class AclDisabled(KonsulError):
    code = "acl_disabled"
    status = 401


# -- shapes -------------------------------------------------------------------------


def _time(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def _links(resolver: AclResolver, token: AclToken, home: AclRegistry) -> list[dict]:
    links = []
    for policy_id in token.policy_ids:
        policy = resolver.policy(policy_id, None, home)
        if policy is not None:  # a deleted policy drops out of the token, as in Consul
            links.append({"ID": policy.policy_id, "Name": policy.name})
    return links


def token_json(resolver: AclResolver, token: AclToken, home: AclRegistry, secret: str | None = None) -> dict:
    create, modify = home.indexes(f"t/{token.accessor_id}")
    return {
        "AccessorID": token.accessor_id,
        "SecretID": secret if secret is not None else (
            "anonymous" if token.accessor_id == ANONYMOUS_ACCESSOR else HIDDEN_SECRET
        ),
        "Description": token.description,
        "Policies": _links(resolver, token, home),
        "Local": token.local,
        "CreateTime": _time(token.created_ms),
        "Hash": token.hash,
        "CreateIndex": create,
        "ModifyIndex": modify,
    }


def policy_json(policy: AclPolicy, home: AclRegistry | None, rules: bool = True) -> dict:
    create, modify = home.indexes(f"p/{policy.policy_id}") if home is not None else (0, 0)
    body = {
        "ID": policy.policy_id,
        "Name": policy.name,
        "Description": policy.description,
        "Datacenters": list(policy.datacenters) or None,
        "Hash": policy.hash,
        "CreateIndex": create,
        "ModifyIndex": modify,
    }
    if rules:
        body["Rules"] = policy.rules
    return body


# -- helpers --------------------------------------------------------------------------


def _ctx_and_resolver() -> tuple[HttpContext, AclResolver]:
    ctx = request.ctx
    resolver = ctx.acl
    if not resolver.enabled:
        raise AclDisabled("ACL support is disabled on this agent (started with --acl=off)")
    return ctx, resolver


def _require(access: str) -> Principal:
    who = principal()
    who.authorizer.require("acl", "", access)
    return who


class GlobalAclElsewhere(KonsulError):
    """A fleet-wide ACL record asked of an agent that does not make them."""

    code = "acl_global_at_hub"
    status = 403


def _require_global_write(ctx: HttpContext) -> Principal:
    """acl:write for a record in ``global`` (policies, non-local tokens, bootstrap).

    Fleet-wide records are made where the fleet's authority is: at the hub,
    or at a standalone edge (no hub). An edge with a hub refuses them (the hub
    would refuse them from the edge's sync link too, so they would hold here
    only); and at the hub a site-local token, which a site itself may have
    made, never writes fleet-wide records.
    """
    if ctx.role == "edge" and ctx.hub_url:
        raise GlobalAclElsewhere(
            f"policies and global tokens are made at the hub ({ctx.hub_url}) and reach this edge by sync; "
            'here only site-local tokens ("Local": true) can be made'
        )
    who = _require("write")
    if ctx.role == "hub" and who.scope != GLOBAL_SCOPE and ctx.acl.enabled:
        raise GlobalAclElsewhere("a site-local token cannot change fleet-wide ACL records; use a global token")
    return who


async def _body() -> dict:
    raw = await request.get_data(cache=True)
    body = parse_json_document(raw or b"{}", "the body")
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    return {key.lower().replace("_", ""): value for key, value in body.items()}


def _global(ctx: HttpContext) -> Scope:
    return ctx.scope(GLOBAL_SCOPE)


def _site_scope(ctx: HttpContext) -> Scope:
    """Where site-local tokens of this request live."""
    name = request.args.get("dc") or ctx.site
    if name == GLOBAL_SCOPE:
        raise InvalidArgument("a Local token belongs to a site: name it with ?dc=<site>")
    return ctx.scope(name)


def _scopes(ctx: HttpContext) -> list[Scope]:
    """The scopes whose tokens a request sees: global, and the site's own."""
    scopes = [_global(ctx)]
    name = request.args.get("dc") or ctx.site
    if name != GLOBAL_SCOPE:
        scopes.append(ctx.scope(name))
    return scopes


def _find_token(ctx: HttpContext, accessor: str) -> tuple[Scope, AclToken]:
    accessor = check_uuid(accessor, "the AccessorID")
    for scope in _scopes(ctx):
        token = scope.acl.token(accessor)
        if token is not None:
            return scope, token
    raise NotFound(f"no ACL token with AccessorID {accessor}")


def _find_policy(ctx: HttpContext, policy_id: str) -> tuple[Scope, AclPolicy]:
    policy_id = check_uuid(policy_id, "the policy ID")
    for scope in _scopes(ctx):
        policy = scope.acl.policy(policy_id)
        if policy is not None:
            return scope, policy
    raise NotFound(f"no ACL policy with ID {policy_id}")


def _policy_ids(ctx: HttpContext, links: object) -> list[str]:
    """Policy links ({"ID": ...} or {"Name": ...}) as IDs of policies that exist."""
    if links is None:
        return []
    if not isinstance(links, list) or not all(isinstance(link, dict) for link in links):
        raise InvalidArgument('Policies is a list of {"ID": ...} or {"Name": ...} objects')
    ids = []
    for link in links:
        link = {key.lower(): value for key, value in link.items()}
        if link.get("id"):
            _, policy = _find_policy(ctx, link["id"])
        elif link.get("name"):
            policy = next(
                (found for found in (s.acl.policy_named(link["name"]) for s in _scopes(ctx)) if found), None
            ) if isinstance(link["name"], str) else None
            if policy is None:
                raise InvalidArgument(f"no ACL policy named {link['name']!r}; create it first")
        else:
            raise InvalidArgument('a policy link names the policy: {"ID": ...} or {"Name": ...}')
        ids.append(policy.policy_id)
    return ids


def _refuse_unsupported(body: dict) -> None:
    for name in _UNSUPPORTED_TOKEN_FIELDS:
        if body.get(name):
            raise InvalidArgument(f"tokens here carry Policies only; {name!r} is not supported")


def _policy_from(body: dict, policy_id: str) -> AclPolicy:
    name = body.get("name")
    if not isinstance(name, str):
        raise InvalidArgument("a policy needs a Name")
    datacenters = body.get("datacenters") or []
    if not isinstance(datacenters, list):
        raise InvalidArgument("Datacenters is a list of site names")
    rules = body.get("rules") or ""
    description = body.get("description") or ""
    return AclPolicy(policy_id, name, description, rules, tuple(datacenters))


# -- bootstrap ----------------------------------------------------------------------------


@acl_api.route("/v1/acl/bootstrap", methods=["PUT", "POST"])
async def bootstrap() -> Response:
    ctx, resolver = _ctx_and_resolver()
    if ctx.role == "edge" and ctx.hub_url:
        raise GlobalAclElsewhere(f"bootstrap the hub ({ctx.hub_url}); its tokens reach this edge by sync")
    scope = _global(ctx)
    token, secret = await acl.bootstrap(scope)
    return json_response(token_json(resolver, token, scope.acl, secret))


# -- tokens ---------------------------------------------------------------------------------


@acl_api.route("/v1/acl/token", methods=["PUT"])
async def create_token() -> Response:
    ctx, resolver = _ctx_and_resolver()
    _require("write")
    body = await _body()
    _refuse_unsupported(body)
    local = body.get("local", False)
    if not isinstance(local, bool):
        raise InvalidArgument("Local is true or false")
    if not local:
        _require_global_write(ctx)
    scope = _site_scope(ctx) if local else _global(ctx)
    token, secret = await acl.create_token(
        scope, body.get("description") or "", _policy_ids(ctx, body.get("policies")), local,
        accessor_id=body.get("accessorid") or None, secret=body.get("secretid") or None,
    )
    return json_response(token_json(resolver, token, scope.acl, secret))


@acl_api.route("/v1/acl/token/self", methods=["GET"])
async def token_self() -> Response:
    ctx, resolver = _ctx_and_resolver()
    who = principal()
    if who.token is None:
        raise NotFound("this request carries no token and the anonymous token does not exist yet (bootstrap first)")
    home = ctx.replica.scope(who.scope).acl
    return json_response(token_json(resolver, who.token, home, request_token() or "anonymous"))


@acl_api.route("/v1/acl/token/<accessor>", methods=["GET", "PUT", "DELETE"])
async def token(accessor: str) -> Response:
    ctx, resolver = _ctx_and_resolver()
    if request.method == "GET":
        _require("read")
        scope, found = _find_token(ctx, accessor)
        return json_response(token_json(resolver, found, scope.acl))
    _require("write")
    scope, found = _find_token(ctx, accessor)
    if scope.name == GLOBAL_SCOPE:
        _require_global_write(ctx)
    if request.method == "DELETE":
        await acl.delete_token(scope, found.accessor_id)
        return json_response(True)
    body = await _body()
    _refuse_unsupported(body)
    if body.get("accessorid") and check_uuid(body["accessorid"], "AccessorID") != found.accessor_id:
        raise InvalidArgument("the body's AccessorID differs from the one in the path")
    if body.get("secretid") and acl.hash_secret(str(body["secretid"])) != found.secret_hash:
        raise InvalidArgument("a token's SecretID cannot be changed; create a new token instead")
    if "local" in body and body["local"] is not None and body["local"] != found.local:
        raise InvalidArgument("a token's Local cannot be changed; create a new token instead")
    updated = await acl.update_token(
        scope, found.accessor_id, body.get("description") or "", _policy_ids(ctx, body.get("policies"))
    )
    return json_response(token_json(resolver, updated, scope.acl))


@acl_api.route("/v1/acl/tokens", methods=["GET"])
async def list_tokens() -> Response:
    ctx, resolver = _ctx_and_resolver()
    _require("read")
    wanted = request.args.get("policy")
    listed = []
    for scope in _scopes(ctx):
        for found in scope.acl.tokens():
            if wanted is None or wanted in found.policy_ids:
                listed.append(token_json(resolver, found, scope.acl))
    return json_response(listed)


# -- policies -------------------------------------------------------------------------------


@acl_api.route("/v1/acl/policy", methods=["PUT"])
async def create_policy() -> Response:
    ctx, _ = _ctx_and_resolver()
    _require_global_write(ctx)
    body = await _body()
    if body.get("id"):
        raise InvalidArgument("a new policy gets its ID here; to change one, PUT /v1/acl/policy/<id>")
    scope = _global(ctx)
    policy = await acl.put_policy(scope, _policy_from(body, str(uuid.uuid4())))
    return json_response(policy_json(policy, scope.acl))


@acl_api.route("/v1/acl/policy/<policy_id>", methods=["GET", "PUT", "DELETE"])
async def policy(policy_id: str) -> Response:
    ctx, _ = _ctx_and_resolver()
    if request.method == "GET":
        _require("read")
        scope, found = _find_policy(ctx, policy_id)
        return json_response(policy_json(found, scope.acl))
    _require_global_write(ctx)
    scope, found = _find_policy(ctx, policy_id)
    if request.method == "DELETE":
        await acl.delete_policy(scope, found.policy_id)
        return json_response(True)
    body = await _body()
    if body.get("id") and check_uuid(body["id"], "ID") != found.policy_id:
        raise InvalidArgument("the body's ID differs from the one in the path")
    updated = await acl.put_policy(scope, _policy_from(body, found.policy_id))
    return json_response(policy_json(updated, scope.acl))


@acl_api.route("/v1/acl/policy/name/<name>", methods=["GET"])
async def policy_by_name(name: str) -> Response:
    ctx, _ = _ctx_and_resolver()
    _require("read")
    for scope in _scopes(ctx):
        found = scope.acl.policy_named(name)
        if found is not None:
            return json_response(policy_json(found, scope.acl))
    raise NotFound(f"no ACL policy named {name!r}")


@acl_api.route("/v1/acl/policies", methods=["GET"])
async def list_policies() -> Response:
    ctx, _ = _ctx_and_resolver()
    _require("read")
    listed = [policy_json(acl.MANAGEMENT_POLICY, None, rules=False)]
    for scope in _scopes(ctx):
        listed.extend(policy_json(found, scope.acl, rules=False) for found in scope.acl.policies())
    return json_response(listed)

