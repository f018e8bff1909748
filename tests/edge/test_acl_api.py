"""``/v1/acl``: Consul's token and policy API on a real edge, driven by py-consul and raw HTTP."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import consul
import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents import MANAGEMENT_TOKEN, EdgeProcess, HubProcess, eventually, free_port, join_token  # noqa: E402

APP_RULES = 'key_prefix "app/" { policy = "write" }'


@pytest.fixture(scope="module")
def acl_edge(tmp_path_factory):
    # Started with an initial management token (MANAGEMENT_TOKEN), which
    # leaves bootstrap to the tests, as a fresh Consul does.
    process = EdgeProcess(tmp_path_factory.mktemp("acl-edge"), acl=True)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def management(acl_edge):
    """The bootstrap token's secret (bootstrapped once for the module)."""
    token = consul.Consul(host=acl_edge.host, port=acl_edge.port).acl.bootstrap()
    assert token["Policies"] == [{"ID": "00000000-0000-0000-0000-000000000001", "Name": "global-management"}]
    return token["SecretID"]


@pytest.fixture
def http(acl_edge):
    with httpx.Client(base_url=acl_edge.url, timeout=10) as client:
        yield client


def still_serving(http) -> None:
    auth = {"X-Consul-Token": MANAGEMENT_TOKEN}
    assert http.put("/v1/kv/acl-test/alive", content=b"yes", headers=auth).json() is True
    assert http.get("/v1/kv/acl-test/alive?raw", headers=auth).content == b"yes"


def test_bootstrap_works_once(acl_edge, management):
    anonymous = consul.Consul(host=acl_edge.host, port=acl_edge.port)
    with pytest.raises(consul.ACLPermissionDenied, match="no longer allowed"):
        anonymous.acl.bootstrap()
    me = consul.Consul(host=acl_edge.host, port=acl_edge.port, token=management).acl.token.read_self()
    assert me["SecretID"] == management and me["Description"] == "Bootstrap Token (Global Management)"


def test_py_consul_policy_and_token_calls(acl_edge, management, http):
    c = consul.Consul(host=acl_edge.host, port=acl_edge.port, token=management)
    policy = c.acl.policy.create("app-write", rules=APP_RULES, description="writes app/")
    assert policy["Name"] == "app-write" and policy["Rules"] == APP_RULES and policy["Description"] == "writes app/"
    assert c.acl.policy.read(policy["ID"])["Rules"] == APP_RULES
    as_dict = c.acl.policy.create("ops-read", rules={"key_prefix": {"ops/": {"policy": "read"}}})
    assert json.loads(as_dict["Rules"]) == {"key_prefix": {"ops/": {"policy": "read"}}}
    names = {p["Name"] for p in c.acl.policy.list()}
    assert {"global-management", "app-write", "ops-read"} <= names

    token = c.acl.token.create(description="app", policies_id=[policy["ID"]])
    secret, accessor = token["SecretID"], token["AccessorID"]
    assert token["Policies"] == [{"ID": policy["ID"], "Name": "app-write"}] and token["Local"] is False
    read = c.acl.token.read(accessor)
    assert read["AccessorID"] == accessor and read["SecretID"] == "<hidden>"  # shown at creation only
    assert read["Policies"] == [{"ID": policy["ID"], "Name": "app-write"}]
    by_name = c.acl.token.create(description="by name", policies_name=["ops-read"])
    assert by_name["Policies"] == [{"ID": as_dict["ID"], "Name": "ops-read"}]
    listed = {t["AccessorID"]: t for t in c.acl.token.list()}
    assert accessor in listed and listed[accessor]["SecretID"] == "<hidden>"

    # The new token is known: it may read itself (header, bearer or query), but not administer ACLs.
    for request in (
        {"headers": {"X-Consul-Token": secret}},
        {"headers": {"Authorization": f"Bearer {secret}"}},
        {"params": {"token": secret}},
    ):
        me = http.get("/v1/acl/token/self", **request)
        assert me.status_code == 200 and me.json()["AccessorID"] == accessor
    refused = http.get("/v1/acl/tokens", headers={"X-Consul-Token": secret})
    assert refused.status_code == 403
    assert refused.json()["error"] == "permission_denied" and "acl:read" in refused.json()["detail"]

    assert c.acl.token.delete(accessor) is True
    gone = http.get("/v1/acl/token/self", headers={"X-Consul-Token": secret})
    assert gone.status_code == 403 and gone.json()["error"] == "acl_not_found"
    assert c.acl.token.read(accessor) is None  # 404
    still_serving(http)


def test_policy_update_by_name_and_delete(acl_edge, management, http):
    auth = {"X-Consul-Token": management}
    created = http.put("/v1/acl/policy", headers=auth, json={"Name": "tmp", "Rules": 'service_prefix "" { policy = "read" }'})
    assert created.status_code == 200
    policy_id = created.json()["ID"]
    updated = http.put(f"/v1/acl/policy/{policy_id}", headers=auth, json={"Name": "tmp2", "Rules": "", "Datacenters": ["s1"]})
    assert updated.json()["Name"] == "tmp2" and updated.json()["Datacenters"] == ["s1"]
    assert http.get("/v1/acl/policy/name/tmp2", headers=auth).json()["ID"] == policy_id
    assert http.delete(f"/v1/acl/policy/{policy_id}", headers=auth).json() is True
    assert http.get(f"/v1/acl/policy/{policy_id}", headers=auth).status_code == 404


def test_local_tokens_and_token_updates(acl_edge, management, http):
    auth = {"X-Consul-Token": management}
    token = http.put("/v1/acl/token", headers=auth, json={"Description": "site", "Local": True}).json()
    assert token["Local"] is True
    accessor = token["AccessorID"]
    updated = http.put(f"/v1/acl/token/{accessor}", headers=auth, json={"Description": "renamed", "Local": True})
    assert updated.status_code == 200 and updated.json()["Description"] == "renamed"
    toggled = http.put(f"/v1/acl/token/{accessor}", headers=auth, json={"Local": False})
    assert toggled.status_code == 400 and toggled.json()["error"] == "invalid_argument"
    me = http.get("/v1/acl/token/self", headers={"X-Consul-Token": token["SecretID"]}).json()
    assert me["Description"] == "renamed" and me["Local"] is True


@pytest.mark.parametrize(
    "body, says",
    [
        ({"Name": "bad", "Rules": 'key "a" { policy = "raed" }'}, "'raed'"),
        ({"Name": "bad", "Rules": 'key_prefx "a" { policy = "read" }'}, "key_prefx"),
        ({"Name": "bad", "Rules": 'key "a" {'}, "not valid HCL"),
        ({"Name": "bad name!", "Rules": ""}, "Name"),
        ({"Name": "global-management"}, "built-in"),
        ({"Rules": ""}, "needs a Name"),
    ],
)
def test_bad_policies_are_refused_and_change_nothing(acl_edge, management, http, body, says):
    auth = {"X-Consul-Token": management}
    before = http.get("/v1/acl/policies", headers=auth).json()
    refused = http.put("/v1/acl/policy", headers=auth, json=body)
    assert refused.status_code == 400 and says in refused.json()["detail"]
    assert http.get("/v1/acl/policies", headers=auth).json() == before
    still_serving(http)


def test_hostile_acl_requests_are_refused(acl_edge, management, http):
    auth = {"X-Consul-Token": management}
    assert http.put("/v1/acl/token", headers=auth, content=b"{" * 100).status_code == 400
    assert http.put("/v1/acl/token", headers=auth, json={"Roles": [{"Name": "r"}]}).status_code == 400
    assert http.put("/v1/acl/token", headers=auth, json={"Policies": [{"ID": "not-a-uuid"}]}).status_code == 400
    assert http.put("/v1/acl/token", headers=auth, json={"Policies": [{"Name": "nope"}]}).status_code == 400
    assert http.get("/v1/acl/token/../../etc", headers=auth).status_code in (400, 404)
    assert http.put("/v1/acl/policy", headers=auth, json={"Name": "big", "Rules": "#" * 70_000}).status_code == 400
    assert http.put("/v1/acl/token", headers={"X-Consul-Token": "made-up"}, json={}).status_code == 403
    assert http.put("/v1/acl/token", json={}).status_code == 403  # anonymous
    still_serving(http)


def test_the_secret_is_never_stored(acl_edge, management, http):
    token = http.put("/v1/acl/token", headers={"X-Consul-Token": management}, json={"Description": "disk"}).json()
    accessor = token["AccessorID"].encode()
    secrets = [token["SecretID"].encode(), management.encode()]

    def stored() -> bytes:
        return b"".join(p.read_bytes() for p in sorted(acl_edge.data_dir.rglob("*")) if p.is_file())

    assert accessor in stored()  # acknowledged writes are durable, so the record is on disk now
    assert not any(secret in stored() for secret in secrets)


def test_a_token_made_at_the_hub_is_enforced_at_the_edge_offline_and_revocation_follows(tmp_path):
    port = free_port()
    hub = HubProcess(tmp_path / "hub", port, acl=True)
    edge = EdgeProcess(tmp_path / "edge", hub_url=hub.url, acl=True, extra=["--site-token", join_token(hub, "s1")])
    try:
        hub_admin = consul.Consul(host=hub.host, port=hub.port, token=consul.Consul(host=hub.host, port=hub.port).acl.bootstrap()["SecretID"])
        policy = hub_admin.acl.policy.create("app", rules=APP_RULES)
        token = hub_admin.acl.token.create(description="app", policies_id=[policy["ID"]])
        secret = token["SecretID"]

        def known_at_edge() -> bool:
            me = httpx.get(f"{edge.url}/v1/acl/token/self", headers={"X-Consul-Token": secret}, timeout=5)
            return me.status_code == 200 and me.json()["Policies"] == [{"ID": policy["ID"], "Name": "app"}]

        eventually(known_at_edge, what="the hub's token at the edge")
        hub.stop(signal.SIGKILL)
        assert known_at_edge()  # the edge enforces from its own replica while the hub is gone
        # An edge with a hub is never bootstrapped itself: the hub makes fleet-wide tokens.
        refused = httpx.put(f"{edge.url}/v1/acl/bootstrap", timeout=5)
        assert refused.status_code == 403 and refused.json()["error"] == "acl_global_at_hub"

        hub = HubProcess(tmp_path / "hub", port, acl=True)
        assert hub_admin.acl.token.delete(token["AccessorID"]) is True
        eventually(
            lambda: httpx.get(f"{edge.url}/v1/acl/token/self", headers={"X-Consul-Token": secret}, timeout=5).json().get("error")
            == "acl_not_found",
            what="the revocation at the edge",
        )
    finally:
        edge.stop()
        hub.stop()
