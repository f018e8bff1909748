"""The selectors each list endpoint's ``?filter=`` offers, named as in Consul's API docs.

A filter is evaluated on the JSON the endpoint answers with, so each schema
below is the shape of one element of that answer.
"""

from __future__ import annotations

from .filter_expr import BOOL, INT, STR, STR_LIST, STR_MAP, Filter, ListOf, MapOf, Schema, parse
from .request import request

NODE: Schema = {
    "ID": STR, "Node": STR, "Address": STR, "Datacenter": STR, "TaggedAddresses": STR_MAP, "Meta": STR_MAP,
}
_SERVICE_ADDRESS = MapOf({"Address": STR, "Port": INT})
_WEIGHTS = {"Passing": INT, "Warning": INT}
AGENT_SERVICE: Schema = {
    "Kind": STR, "ID": STR, "Service": STR, "Tags": STR_LIST, "Meta": STR_MAP, "Port": INT, "Address": STR,
    "TaggedAddresses": _SERVICE_ADDRESS, "Weights": _WEIGHTS, "EnableTagOverride": BOOL, "Datacenter": STR,
}
CATALOG_SERVICE: Schema = {
    "ID": STR, "Node": STR, "Address": STR, "Datacenter": STR, "TaggedAddresses": STR_MAP, "NodeMeta": STR_MAP,
    "ServiceKind": STR, "ServiceID": STR, "ServiceName": STR, "ServiceTags": STR_LIST, "ServiceAddress": STR,
    "ServiceTaggedAddresses": _SERVICE_ADDRESS, "ServiceMeta": STR_MAP, "ServicePort": INT,
    "ServiceWeights": _WEIGHTS, "ServiceEnableTagOverride": BOOL, "CreateIndex": INT, "ModifyIndex": INT,
}
CHECK: Schema = {
    "Node": STR, "CheckID": STR, "Name": STR, "Status": STR, "Notes": STR, "Output": STR, "ServiceID": STR,
    "ServiceName": STR, "ServiceTags": STR_LIST, "Type": STR, "Interval": STR, "Timeout": STR,
}
HEALTH_SERVICE: Schema = {"Node": NODE, "Service": AGENT_SERVICE, "Checks": ListOf(CHECK)}
MEMBER: Schema = {"Name": STR, "Addr": STR, "Port": INT, "Tags": STR_MAP, "Status": INT}


def request_filter(schema: Schema) -> Filter | None:
    """The request's ``?filter=``, parsed against ``schema``; None when there is none (400 if bad)."""
    text = request.args.get("filter")
    if text is None or text == "":
        return None
    return parse(text, schema)


def apply(found: Filter | None, documents: list) -> list:
    return documents if found is None else [d for d in documents if found(d)]
