"""The web console in a real browser against a real hub and edge with ACLs on.

Log in with a token, watch a site connect, edit a key at the hub and see it at
the edge (and a stale edit refused), services with their checks, a device's
desired field edited and reported back by a simulated device, its telemetry
chart, token rotation, and what a narrow token is not shown.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import expect
from agents import MANAGEMENT_TOKEN, AgentProcess, EdgeProcess, HubProcess, eventually, join_token

from screenshots import screenshot

HEADERS = {"X-Consul-Token": MANAGEMENT_TOKEN}
DEVICE = "ui-0000"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[tuple[HubProcess, EdgeProcess]]:
    hub = HubProcess(tmp_path_factory.mktemp("hub"), acl=True)
    edge = EdgeProcess(
        tmp_path_factory.mktemp("edge"), site="s1", node="gw1", hub_url=hub.url, acl=True,
        extra=["--site-token", join_token(hub, "s1", "write"), "--mqtt-addr", "127.0.0.1:0"],
    )
    try:
        yield hub, edge
    finally:
        edge.stop()
        hub.stop()


@pytest.fixture(scope="module")
def simulated(fleet) -> Iterator[AgentProcess]:
    """One simulated MQTT device at the edge, sampling twice a second."""
    _, edge = fleet
    host, port = edge.mqtt_addr()
    sim = AgentProcess([
        "sim", "--devices", "1", "--protocol", "mqtt", "--prefix", "ui-", "--http-addr", edge.addr,
        "--mqtt-addr", f"{host}:{port}", "--rate", "2", "--duration", "300", "--report-every", "0",
        "--seed", "3", "--token", MANAGEMENT_TOKEN,
    ])
    yield sim
    sim.stop()


def log_in(page, url: str, secret: str = MANAGEMENT_TOKEN) -> None:
    page.goto(f"{url}/ui/")
    page.get_by_label("ACL token").fill(secret)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_selector("#conn[data-state=live]")


def raw_value(url: str, key: str, site: str | None = None) -> bytes | None:
    params = {"raw": ""} | ({"dc": site} if site else {})
    response = httpx.get(f"{url}/v1/kv/{key}", params=params, headers=HEADERS)
    return response.content if response.status_code == 200 else None


def test_the_console_is_served_with_a_strict_policy_and_revalidated_by_etag(fleet):
    hub, edge = fleet
    for agent in (hub, edge):
        index = httpx.get(f"{agent.url}/ui/", headers={"Accept-Encoding": "gzip"})
        assert index.status_code == 200 and "<script type=\"module\" src=\"app.js\">" in index.text
        policy = index.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert index.headers["content-encoding"] == "gzip"
        script = httpx.get(f"{agent.url}/ui/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        again = httpx.get(f"{agent.url}/ui/app.js", headers={"If-None-Match": script.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        missing = httpx.get(f"{agent.url}/ui/nothing.js")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    # The files need no token; the data still does.
    assert httpx.get(f"{hub.url}/v1/sites").status_code == 403


def test_log_in_and_see_the_site_connected_with_its_lag(fleet, page):
    hub, _ = fleet
    page.goto(f"{hub.url}/ui/")
    page.wait_for_url("**/ui/#/login")
    screenshot(page, "login")
    page.get_by_label("ACL token").fill("not-a-token")
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("alert").filter(has_text="Not logged in").wait_for()
    page.get_by_label("ACL token").fill(MANAGEMENT_TOKEN)
    page.get_by_role("button", name="Log in").click()
    row = page.locator("tr[data-site=s1]")
    row.get_by_text("connected", exact=True).wait_for()
    assert row.locator("td.lag").inner_text().endswith(" s")
    assert page.evaluate("sessionStorage.getItem('konsul.token')") == MANAGEMENT_TOKEN
    assert page.evaluate("localStorage.length") == 0
    screenshot(page, "fleet")
    page.get_by_role("link", name="s1").click()
    page.locator("dd.lag").wait_for()
    screenshot(page, "site")


def test_edit_a_key_at_the_hub_see_it_at_the_edge_and_a_stale_edit_refused(fleet, page):
    hub, edge = fleet
    httpx.put(f"{hub.url}/v1/kv/app/config", params={"dc": "s1", "flags": "7", "ttl": "1h"}, content=b'{"speed": 1}',
              headers=HEADERS).raise_for_status()
    eventually(lambda: raw_value(edge.url, "app/config") == b'{"speed": 1}', what="the key at the edge")
    log_in(page, hub.url)
    page.goto(f"{hub.url}/ui/#/kv/s1?prefix=app/&key=app/config")
    value = page.get_by_label("Value")
    expect(value).to_have_value(re.compile("speed"))
    assert page.get_by_label("Flags").input_value() == "7"
    page.get_by_text("Expires").wait_for()  # written with a TTL
    # Not JSON: refused before it is sent.
    value.fill('{"speed": ')
    assert page.get_by_role("button", name="Save").is_disabled()
    value.fill('{"speed": 2}')
    page.get_by_role("button", name="Save").click()
    page.get_by_text("Saved.").wait_for()
    eventually(lambda: raw_value(edge.url, "app/config") == b'{"speed": 2}',
               what="the console's edit at the edge")
    screenshot(page, "kv")
    # Someone else writes at the edge; the open editor's save is refused, not lost silently.
    expect(value).to_have_value(re.compile("2"))
    httpx.put(f"{edge.url}/v1/kv/app/config", content=b'{"speed": 9}', headers=HEADERS).raise_for_status()
    eventually(lambda: raw_value(hub.url, "app/config", "s1") == b'{"speed": 9}', what="the edge's write at the hub")
    value.fill('{"speed": 3}')
    page.get_by_role("button", name="Save").click()
    page.get_by_role("alert").filter(has_text="Refused: stale edit").wait_for()
    assert "speed\": 9" in page.get_by_role("alert").filter(has_text="Refused").inner_text()
    assert raw_value(hub.url, "app/config", "s1") == b'{"speed": 9}'
    screenshot(page, "kv-stale")
    # A new key, its name with characters a URL gives meaning to: created only if absent (cas=0).
    page.get_by_role("button", name="New key").click()
    page.get_by_label("Key name").fill("app/odd?#%key")
    page.get_by_label("Value").fill("plain text")
    page.get_by_role("button", name="Save").click()
    eventually(lambda: raw_value(edge.url, "app/odd%3F%23%25key") == b"plain text", what="the new key at the edge")


def test_services_show_their_instances_and_check_output(fleet, page):
    hub, edge = fleet
    httpx.put(f"{edge.url}/v1/agent/service/register", headers=HEADERS,
              json={"Name": "plc", "ID": "plc-1", "Port": 502, "Check": {"TTL": "60s"}}).raise_for_status()
    httpx.put(f"{edge.url}/v1/agent/check/pass/service:plc-1", params={"note": "line 1 running"},
              headers=HEADERS).raise_for_status()
    log_in(page, hub.url)
    page.goto(f"{hub.url}/ui/#/services/s1")
    instances = page.get_by_role("table", name="Instances of plc")
    instances.get_by_text("passing").first.wait_for()
    instances.get_by_text("line 1 running").wait_for()
    screenshot(page, "services")


def test_edit_a_desired_field_and_see_the_device_report_it_and_its_chart(fleet, simulated, page):
    hub, edge = fleet
    eventually(lambda: any(d["Online"] for d in httpx.get(f"{hub.url}/v1/devices", params={"dc": "s1"},
                                                          headers=HEADERS).json()), what="the device online at the hub")
    log_in(page, hub.url)
    page.goto(f"{hub.url}/ui/#/devices/s1?online=true")
    page.locator(f"tr[data-device='{DEVICE}']").get_by_text("online").wait_for()
    screenshot(page, "devices")
    page.get_by_role("link", name=DEVICE).click()
    page.get_by_label("New desired field name").fill("mode")
    page.get_by_label("New desired field value (JSON)").fill('"eco"')
    page.get_by_role("button", name="Add field").click()
    reported = page.locator("tr[data-field=mode] td.reported")
    reported.filter(has_text='"eco"').wait_for()
    # Edit the same field in place; the device follows.
    page.get_by_label("Desired mode (JSON)").fill('"boost"')
    page.get_by_role("button", name="Set desired mode").click()
    reported.filter(has_text='"boost"').wait_for()
    twin = httpx.get(f"{hub.url}/v1/devices/{DEVICE}/twin", params={"dc": "s1"}, headers=HEADERS).json()
    assert twin["Desired"]["mode"] == "boost"
    # The chart draws the samples the hub stores: the simulated device's own telemetry.
    eventually(lambda: len(httpx.get(f"{hub.url}/v1/devices/{DEVICE}/telemetry", params={"dc": "s1"},
                                     headers=HEADERS).json()) >= 3, what="the device's samples stored at the hub")
    expect(page.locator("svg.chart circle.point").nth(2)).to_be_attached(timeout=15_000)
    assert page.locator("svg.chart polyline").count() >= 1  # one line per numeric field
    screenshot(page, "device")
    # A new token, shown once.
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Rotate token").click()
    secret = page.get_by_label("New device token").inner_text()
    assert len(secret) >= 16
    page.get_by_role("button", name="I have copied it").click()
    assert page.get_by_label("New device token").count() == 0


def test_a_token_sees_only_what_it_may_read(fleet, page):
    hub, _ = fleet
    httpx.put(f"{hub.url}/v1/kv/app/limits", params={"dc": "s1"}, content=b'{"speed": 5}',
              headers=HEADERS).raise_for_status()
    policy = httpx.put(f"{hub.url}/v1/acl/policy", headers=HEADERS, json={
        "Name": "ui-app-reader", "Rules": 'key_prefix "app/" { policy = "read" }'})
    policy.raise_for_status()
    made = httpx.put(f"{hub.url}/v1/acl/token", headers=HEADERS, json={"Policies": [{"Name": "ui-app-reader"}]})
    made.raise_for_status()
    log_in(page, hub.url, made.json()["SecretID"])
    page.get_by_text("Your token may not read the fleet's sites.").wait_for()
    assert page.locator("tr[data-site]").count() == 0
    page.goto(f"{hub.url}/ui/#/devices/s1")
    # Lists are filtered to what the token may read: the simulated device is not shown.
    page.get_by_text("No device matches.").wait_for()
    assert page.locator("tr[data-device]").count() == 0
    page.goto(f"{hub.url}/ui/#/kv/s1?prefix=app/&key=app/limits")
    expect(page.get_by_label("Value")).to_have_value(re.compile("speed"))
    screenshot(page, "narrow-token")
