"""``/v1/devices/<id>/desired``, ``/reported`` and ``/twin``: device twins.

``PUT`` replaces a side with the body; ``PATCH`` (or ``POST``) merges the body
into it, a ``null`` field removing that field (JSON merge patch at the top
level). Both answer the side as it is afterwards. Desired state is writable at
the hub (``?dc=<site>``) and at the edge, connected or not; the replicas merge
field by field (``sync/twin.py``).

Reading a twin needs ``device:read`` on the device, writing either side
``device:write`` (docs/acl.md).
"""

from __future__ import annotations

from konsul.sync.twin import SIDES

from .agent_routes import json_body
from .device_routes import registered_device_scope
from .request import request
from .responses import Response, json_response
from .router import Routes

twin_api = Routes("twin")


@twin_api.route("/v1/devices/<device_id>/<any(desired, reported):side>", methods=["GET", "PUT", "PATCH", "POST"])
async def twin_side(device_id: str, side: str) -> Response:
    assert side in SIDES
    scope = registered_device_scope(device_id, "read" if request.method == "GET" else "write")
    if request.method == "GET":
        return json_response(scope.devices.twin.document(side, device_id))
    document = await json_body()
    return json_response(await scope.write_twin(side, device_id, document, replace=request.method == "PUT"))


@twin_api.route("/v1/devices/<device_id>/twin", methods=["GET"])
async def twin(device_id: str) -> Response:
    scope = registered_device_scope(device_id)
    view = scope.devices.twin
    return json_response(
        {
            "Device": device_id,
            "Site": scope.name,
            "Desired": view.document("desired", device_id),
            "Reported": view.document("reported", device_id),
            "Delta": view.delta(device_id),
            "Conflicts": [
                {
                    "Side": c.side,
                    "Field": c.field,
                    "Value": c.value,
                    "Deleted": c.deleted,
                    "Stamp": c.stamp.encode(),
                }
                for c in view.conflicts(device_id)
            ],
        }
    )
