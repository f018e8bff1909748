// The Konsul console: a hash router over pages that read the API with the session's token.
import { api, ApiError, b64decode, live, onConnection, qs, token } from "./api.js";
import { drawChart } from "./chart.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
let agent = null; // { hub: bool, site: own site (edge) }
let pageAbort = null;

// h("tag.class", {attrs}, ...children): a DOM element; text children are text nodes.
function h(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const node = document.createElement(tag);
  if (classes.length) node.className = classes.join(" ");
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) if (child != null) node.append(child instanceof Node ? child : String(child));
  return node;
}
const link = (href, text, attrs = {}) => h("a", { href, ...attrs }, text);
const badge = (ok, yes, no, warn = false) => h(`span.badge.${ok ? "ok" : warn ? "warn" : "bad"}`, {}, ok ? yes : no);
const note = (text, kind = "") => h(`div.note${kind ? "." + kind : ""}`, { role: kind === "bad" ? "alert" : "status" }, text);
const when = (iso) => iso ? new Date(iso).toLocaleString() : "never";
const bytes = (n) => n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(1)} MiB`;
// A key in a URL path: each segment escaped ("?", "#", "%" too), the slashes kept.
const keyPath = (key) => key.split("/").map(encodeURIComponent).join("/");
const dcq = (site) => agent.hub ? { dc: site } : {};
function hidden(error, what) {
  if (error instanceof ApiError && (error.status === 403 || error.status === 401)) {
    return note(`Your token may not read ${what}.`, "warn");
  }
  return note(`${what}: ${error.message}`, "bad");
}
function table(headers, rows, label) {
  return h("div.scroll", {}, h("table", { "aria-label": label },
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
    h("tbody", {}, rows)));
}

// ---- pages -----------------------------------------------------------------------------------

function loginPage() {
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "off", "aria-label": "ACL token", placeholder: "ACL token (SecretID)", size: 40 });
  const message = h("div");
  const form = h("form.row", { "aria-label": "Log in", onsubmit: async (event) => {
    event.preventDefault();
    token.set(input.value.trim());
    try {
      await api("/v1/acl/token/self");
      location.hash = "#/";
    } catch (error) {
      // With ACLs off, the token API says so; anything else is a bad token.
      if (error.code === "acl_disabled" || error.status === 401 && !input.value.trim()) { location.hash = "#/"; return; }
      token.clear();
      message.replaceChildren(note(`Not logged in: ${error.message}`, "bad"));
    }
  } }, h("label", { for: "token" }, "Token"), input, h("button.primary", { type: "submit" }, "Log in"));
  return [h("h1", {}, "Log in"), h("p.muted", {}, "The token is kept in this tab only (sessionStorage) and sent as X-Consul-Token."), form, message];
}

// An edge's telemetry buffer as the hub last heard it (null before the edge reported, or from an older edge).
function telemetryCounts(t) {
  if (!t) return "—";
  return t.Dropped ? [`${t.Buffered} / `, h("span.warn", {}, String(t.Dropped))] : `${t.Buffered} / 0`;
}

function fleetPage(signal) {
  const body = h("div", {}, h("p", {}, "Loading sites…"));
  let devices = {};
  const render = (sites) => {
    const rows = sites.map((s) => {
      const d = devices[s.Site] || { online: 0, total: 0 };
      return h("tr", { "data-site": s.Site },
        h("td", {}, link(`#/site/${encodeURIComponent(s.Site)}`, s.Site)),
        h("td", {}, badge(s.Connected, "connected", "disconnected")),
        h("td", {}, when(s.LastSeen)),
        h("td.lag", {}, `${s.LagSeconds} s`),
        h("td", {}, String(s.PendingToEdge)),
        h("td", {}, s.Conflicts ? h("span.warn", {}, String(s.Conflicts)) : "0"),
        h("td", {}, `${bytes(s.BytesSent)} / ${bytes(s.BytesReceived)}`),
        h("td", {}, `${d.online} / ${d.total}`),
        h("td.telemetry", {}, telemetryCounts(s.Telemetry)));
    });
    body.replaceChildren(sites.length ? table(["Site", "Link", "Last seen", "Lag", "Pending to edge", "Conflicts", "Bytes sent / received", "Devices online / total", "Telemetry buffered / dropped"], rows, "Sites")
      : note("No site has joined yet."));
  };
  let lastSites = null; // null until /v1/sites answers (or when it refuses the token)
  live("/v1/sites", ({ data }) => { lastSites = data || []; render(lastSites); }, signal, (e) => body.replaceChildren(hidden(e, "the fleet's sites"),
    h("p", {}, "Sites: ", agent.sites.map((s) => [link(`#/site/${encodeURIComponent(s)}`, s), " "]))));
  live("/v1/devices?dc=global", ({ data }) => {
    devices = {};
    for (const d of data || []) {
      const c = devices[d.Site] || (devices[d.Site] = { online: 0, total: 0 });
      c.total += 1; if (d.Online) c.online += 1;
    }
    if (lastSites) render(lastSites);
  }, signal, () => {});
  const telemetry = h("div");
  live("/v1/sync/status", ({ data }) => {
    const t = (data && data.Telemetry) || {};
    telemetry.replaceChildren(h("p.muted", {}, `Telemetry at the hub: ${t.Stored ?? 0} samples stored, ${t.Duplicates ?? 0} duplicates dropped.`));
  }, signal, () => {});
  return [h("h1", {}, "Fleet"), body, telemetry, h("p", {}, link("#/kv/global", "Fleet-wide KV (global scope)"))];
}

function sitePage(signal, site) {
  const status = h("div", {}, "Loading…");
  const links = h("p.row", {}, link(`#/kv/${site}`, "KV"), link(`#/services/${site}`, "Services and health"), link(`#/devices/${site}`, "Devices"));
  if (agent.hub) {
    live("/v1/sites", ({ data }) => {
      const s = (data || []).find((x) => x.Site === site);
      if (!s) { status.replaceChildren(note(`The hub knows no site ${site}.`, "warn")); return; }
      status.replaceChildren(h("dl", {},
        h("dt", {}, "Link"), h("dd", {}, badge(s.Connected, "connected", "disconnected")),
        h("dt", {}, "Last seen"), h("dd", {}, when(s.LastSeen)),
        h("dt", {}, "Lag"), h("dd.lag", {}, `${s.LagSeconds} s`),
        h("dt", {}, "Pending to edge"), h("dd", {}, String(s.PendingToEdge)),
        h("dt", {}, "Conflicts"), h("dd", {}, String(s.Conflicts)),
        h("dt", {}, "Bytes sent / received"), h("dd", {}, `${bytes(s.BytesSent)} / ${bytes(s.BytesReceived)}`),
        h("dt", {}, "Telemetry buffered / dropped"), h("dd.telemetry", {}, telemetryCounts(s.Telemetry))));
    }, signal, (e) => status.replaceChildren(hidden(e, "the site's sync state")));
  } else {
    live("/v1/sync/status", ({ data }) => {
      const peers = (data && data.Peers) || [];
      const t = (data && data.Telemetry) || {};
      status.replaceChildren(
        peers.length ? table(["Peer", "Link", "Last contact", "Pending", "Conflicts", "Bytes sent / received"], peers.map((p) => h("tr", {},
          h("td", {}, p.Peer || p.URL || "hub"), h("td", {}, badge(p.Connected, "connected", "disconnected")),
          h("td", {}, when(p.LastContact)), h("td", {}, String(p.PendingChanges)), h("td", {}, String(p.Conflicts)),
          h("td", {}, `${bytes(p.BytesSent || 0)} / ${bytes(p.BytesReceived || 0)}`))), "Sync peers") : note("This edge runs without a hub."),
        h("p.muted", {}, `Telemetry: ${t.Buffered ?? 0} buffered (${bytes(t.BufferedBytes || 0)}), ${t.Dropped ?? 0} dropped, ${t.Forwarded ?? 0} forwarded.`));
    }, signal, (e) => status.replaceChildren(hidden(e, "the sync state")));
  }
  return [h("h1", {}, `Site ${site}`), links, h("h2", {}, "Sync"), status];
}

function kvPage(signal, site, params) {
  const prefix = params.get("prefix") || "";
  const selected = params.get("key");
  const list = h("div", {}, "Loading…");
  const editor = h("section", { "aria-label": "Key" });
  const go = (p) => `#/kv/${site}?${new URLSearchParams(p)}`;
  const filter = h("form.row", { onsubmit: (e) => { e.preventDefault(); location.hash = go({ prefix: e.target.prefix.value }); } },
    h("input", { name: "prefix", value: prefix, "aria-label": "Key prefix", placeholder: "prefix/" }), h("button", { type: "submit" }, "Browse"),
    h("button", { type: "button", onclick: () => { location.hash = go({ prefix, key: "" , new: "1" }); } }, "New key"));
  live(`/v1/kv/${keyPath(prefix)}${qs({ recurse: true, ...dcq(site) })}`, ({ status, data }) => {
    if (status === 404 || !data) { list.replaceChildren(note("No keys under this prefix.")); return; }
    list.replaceChildren(h("ul.keys", { "aria-label": "Keys" }, data.map((e) => h("li", {},
      link(go({ prefix, key: e.Key }), e.Key, { "aria-current": e.Key === selected ? "true" : null })))));
  }, signal, (e) => list.replaceChildren(hidden(e, "these keys")));
  if (selected !== null) keyEditor(editor, signal, site, selected, params.get("new") === "1", () => go({ prefix }));
  return [h("h1", {}, `KV · ${site}`), filter, h("div.grid", {}, h("nav", { "aria-label": "Keys" }, list), editor)];
}

function keyEditor(root, signal, site, key, isNew, back) {
  let base = null; // the entry the edit started from: its ModifyIndex is the CAS index
  let saving = false; // our own save is under way: its change is not "someone else's"
  const keyInput = h("input", { name: "key", value: key, "aria-label": "Key name", size: 40, readonly: isNew ? null : true });
  const value = h("textarea", { name: "value", "aria-label": "Value", spellcheck: "false" });
  const asJson = h("input", { type: "checkbox", name: "json", "aria-label": "Validate as JSON" });
  const flags = h("input", { type: "number", name: "flags", min: 0, value: 0, "aria-label": "Flags", size: 8 });
  const ttl = h("input", { name: "ttl", "aria-label": "TTL (e.g. 30s), empty for none", placeholder: "TTL e.g. 30s", size: 10 });
  const save = h("button.primary", { type: "submit" }, "Save");
  const del = h("button", { type: "button", onclick: async () => {
    if (!confirm(`Delete ${key}?`)) return;
    try {
      const { data } = await api(`/v1/kv/${keyPath(key)}${qs({ cas: base ? base.ModifyIndex : undefined, ...dcq(site) })}`, { method: "DELETE" });
      if (data === false) message.replaceChildren(note("Refused: the key changed since you opened it. Reload to see it.", "bad"));
      else location.hash = back();
    } catch (error) { message.replaceChildren(note(error.message, "bad")); }
  } }, "Delete");
  const message = h("div", { id: "kv-message" });
  const info = h("p.muted");
  const history = h("section", { "aria-label": "History" });
  const validate = () => {
    let ok = true;
    if (asJson.checked) { try { JSON.parse(value.value); } catch (error) { ok = false; message.replaceChildren(note(`Not JSON: ${error.message}`, "bad")); } }
    if (ok && message.dataset.kind === "json") message.replaceChildren();
    message.dataset.kind = ok ? "" : "json";
    save.disabled = !ok;
    value.setAttribute("aria-invalid", ok ? "false" : "true");
  };
  value.addEventListener("input", validate);
  asJson.addEventListener("change", validate);
  const form = h("form", { "aria-label": "Edit key", onsubmit: async (event) => {
    event.preventDefault();
    const name = keyInput.value.trim();
    const cas = base ? base.ModifyIndex : 0; // 0: create only, never overwrite a key made meanwhile
    saving = true;
    try {
      const { data } = await api(`/v1/kv/${keyPath(name)}${qs({ cas, flags: flags.value || 0, ttl: ttl.value.trim() || undefined, ...dcq(site) })}`,
        { method: "PUT", body: value.value });
      if (data === true) {
        message.replaceChildren(note("Saved."));
        if (isNew) { location.hash = `#/kv/${site}?${new URLSearchParams({ prefix: "", key: name })}`; return; }
        await load();
      } else {
        const now = await api(`/v1/kv/${keyPath(name)}${qs(dcq(site))}`);
        const current = now.status === 200 ? b64decode(now.data[0].Value) : "(deleted)";
        message.replaceChildren(note(`Refused: stale edit. The key changed since you opened it (index ${cas} → ${now.index}); it now holds: ${current}. Your text is kept; reload to start from the new value.`, "bad"));
        message.dataset.kind = "stale";
      }
    } catch (error) { message.replaceChildren(note(`Not saved: ${error.message}`, "bad")); }
    finally { saving = false; }
  } },
  h("div.row", {}, keyInput), value,
  h("div.row", {}, h("label", {}, asJson, "JSON"), h("label", {}, "Flags", flags), h("label", {}, "TTL", ttl), save, isNew ? null : del,
    isNew ? null : h("button", { type: "button", onclick: () => load() }, "Reload")),
  message);
  async function load() {
    try {
      const { status, data, index } = await api(`/v1/kv/${keyPath(key)}${qs(dcq(site))}`);
      if (status === 404) { info.textContent = "This key does not exist (any more)."; base = null; return; }
      base = data[0];
      value.value = b64decode(base.Value);
      flags.value = base.Flags;
      try { JSON.parse(value.value); asJson.checked = value.value.trim() !== ""; } catch { asJson.checked = false; }
      info.textContent = `Modify index ${base.ModifyIndex}, create index ${base.CreateIndex}, lock index ${base.LockIndex}` + (base.Session ? `, held by session ${base.Session}` : "") + ` (scope index ${index}).` +
        (base.Expires ? ` Expires ${new Date(base.Expires).toLocaleString()} (TTL).` : "");
      validate();
    } catch (error) { root.replaceChildren(hidden(error, `the key ${key}`)); }
  }
  root.replaceChildren(h("h2", {}, isNew ? "New key" : key), info, form, history);
  if (isNew) return;
  load();
  live(`/v1/kv/${keyPath(key)}${qs({ history: true, ...dcq(site) })}`, ({ data }) => {
    const records = Array.isArray(data) ? data : [];
    const live0 = records[0];
    if (base && live0 && !live0.Conflict && !saving && message.dataset.kind !== "stale") {
      // The key changed under the open editor: say so, keep the user's text and its CAS index.
      api(`/v1/kv/${keyPath(key)}${qs(dcq(site))}`).then(({ data: d }) => {
        if (d && d[0] && base && !saving && d[0].ModifyIndex !== base.ModifyIndex) message.replaceChildren(note("This key changed since you opened it: saving will be refused; reload first.", "warn"));
      }).catch(() => {});
    }
    const conflicts = records.filter((r) => r.Conflict);
    history.replaceChildren(...[h("h2", {}, "History"),
      conflicts.length ? note(`${conflicts.length} conflicting write(s): concurrent writers disagreed; the later stamp won.`, "warn") : null,
      h("ol.timeline", { "aria-label": "History timeline" }, records.map((r) => h("li", { "data-conflict": r.Conflict ? "true" : "false" },
        h("span", {}, `${r.Time} · ${r.Op} · ${r.Replica} · flags ${r.Flags} · ${r.Size} B `),
        r.Conflict ? h("span.badge.warn", {}, "conflict loser") : null,
        r.Value != null ? h("pre.value", {}, b64decode(r.Value)) : null)))].filter(Boolean));
  }, signal, (e) => history.replaceChildren(hidden(e, "this key's history")));
}

function servicesPage(signal, site) {
  const body = h("div", {}, "Loading…");
  live(`/v1/health/state/any${qs(dcq(site))}`, async ({ data }) => {
    const checks = data || [];
    let services = {};
    try { services = (await api(`/v1/catalog/services${qs(dcq(site))}`, { signal })).data || {}; } catch {}
    const names = new Set([...Object.keys(services), ...checks.map((c) => c.ServiceName).filter(Boolean)]);
    const sections = [];
    for (const name of [...names].sort()) {
      let nodes = [];
      try { nodes = (await api(`/v1/health/service/${encodeURIComponent(name)}${qs(dcq(site))}`, { signal })).data || []; } catch (error) { sections.push(hidden(error, `service ${name}`)); continue; }
      sections.push(h("h2", {}, name), table(["Instance", "Address", "Checks"], nodes.map((n) => h("tr", {},
        h("td", {}, `${n.Service.ID} on ${n.Node.Node}`), h("td", {}, `${n.Service.Address || n.Node.Address}:${n.Service.Port}`),
        h("td", {}, (n.Checks || []).map((c) => h("div", {}, h(`span.badge.${c.Status === "passing" ? "ok" : c.Status === "warning" ? "warn" : "bad"}`, {}, c.Status),
          ` ${c.Name} `, c.Output ? h("pre", {}, c.Output) : null))))), `Instances of ${name}`));
    }
    const nodeChecks = checks.filter((c) => !c.ServiceID);
    if (nodeChecks.length) sections.push(h("h2", {}, "Node checks"), table(["Node", "Check", "Status", "Output"], nodeChecks.map((c) => h("tr", {},
      h("td", {}, c.Node), h("td", {}, c.Name), h("td", {}, c.Status), h("td", {}, h("pre", {}, c.Output || "")))), "Node checks"));
    body.replaceChildren(...(sections.length ? sections : [note("No services registered.")]));
  }, signal, (e) => body.replaceChildren(hidden(e, "this site's services")));
  return [h("h1", {}, `Services · ${site}`), body];
}

function devicesPage(signal, site, params) {
  const body = h("div", {}, "Loading…");
  const filters = { type: params.get("type") || "", tag: params.get("tag") || "", online: params.get("online") || "" };
  const form = h("form.row", { "aria-label": "Filter devices", onsubmit: (e) => {
    e.preventDefault();
    const p = Object.fromEntries([...new FormData(e.target)].filter(([, v]) => v));
    location.hash = `#/devices/${site}?${new URLSearchParams(p)}`;
  } },
  h("input", { name: "type", value: filters.type, placeholder: "type", "aria-label": "Device type" }),
  h("input", { name: "tag", value: filters.tag, placeholder: "tag", "aria-label": "Tag" }),
  h("select", { name: "online", "aria-label": "Presence" }, [["", "online or not"], ["true", "online"], ["false", "offline"]].map(([v, t]) =>
    h("option", { value: v, selected: v === filters.online }, t))),
  h("button", { type: "submit" }, "Filter"));
  live(`/v1/devices${qs({ ...dcq(site), type: filters.type || undefined, tag: filters.tag || undefined, online: filters.online || undefined })}`, ({ data }) => {
    const devices = data || [];
    body.replaceChildren(devices.length ? table(["Device", "Type", "Tags", "Presence", "Protocol", "Last seen", "Firmware"], devices.map((d) => h("tr", { "data-device": d.ID },
      h("td", {}, link(`#/device/${site}/${encodeURIComponent(d.ID)}`, d.ID)), h("td", {}, d.Type), h("td", {}, (d.Tags || []).join(", ")),
      h("td", {}, badge(d.Online, "online", "offline")), h("td", {}, d.Protocol || "—"), h("td", {}, when(d.LastSeen)), h("td", {}, d.Firmware || "—"))), "Devices")
      : note("No device matches."));
  }, signal, (e) => body.replaceChildren(hidden(e, "this site's devices")));
  return [h("h1", {}, `Devices · ${site}`), form, body];
}

function devicePage(signal, site, id) {
  const dq = qs(dcq(site));
  const base = `/v1/devices/${encodeURIComponent(id)}`;
  const head = h("div", {}, "Loading…");
  const twin = h("section", { "aria-label": "Twin" });
  const chart = h("section", { "aria-label": "Telemetry" });
  const rotation = h("div");
  live(`${base}${dq}`, ({ data: d }) => {
    if (!d || !d.ID) { head.replaceChildren(note(`No device ${id} at ${site}.`, "warn")); return; }
    head.replaceChildren(h("p", {}, badge(d.Online, "online", "offline"), ` ${d.Type} · protocol ${d.Protocol || "—"} · last seen ${when(d.LastSeen)} · tags ${(d.Tags || []).join(", ") || "none"} · firmware ${d.Firmware || "—"}`));
  }, signal, (e) => head.replaceChildren(hidden(e, `device ${id}`)));
  const rotate = h("button", { type: "button", onclick: async () => {
    if (!confirm(`Issue a new token for ${id}? The current one stops working at once.`)) return;
    try {
      const current = (await api(`${base}${dq}`)).data;
      const { data } = await api(`${base}${qs({ "rotate-token": true, ...dcq(site) })}`, { method: "PUT",
        body: { Type: current.Type, Tags: current.Tags, Attributes: current.Attributes, Firmware: current.Firmware, KVRead: current.KVRead, KVWrite: current.KVWrite } });
      rotation.replaceChildren(note("The new token, shown this once (only its hash is kept): copy it to the device now."),
        h("pre.secret", { "aria-label": "New device token", id: "new-token" }, data.Token),
        h("button", { type: "button", onclick: () => rotation.replaceChildren() }, "I have copied it"));
    } catch (error) { rotation.replaceChildren(hidden(error, "(write) this device")); }
  } }, "Rotate token");
  const renderTwin = (t) => {
    // Keep what the user is typing across a re-render (a report from the device arrives meanwhile).
    const typing = new Map([...twin.querySelectorAll("input")].filter((i) => i.value !== i.defaultValue).map((i) => [i.name, i.value]));
    const focused = document.activeElement && twin.contains(document.activeElement) ? document.activeElement.name : null;
    const desired = t.Desired || {}, reported = t.Reported || {}, delta = t.Delta || {};
    const fields = [...new Set([...Object.keys(desired), ...Object.keys(reported)])].sort();
    const rows = fields.map((f) => {
      const input = h("input", { name: `desired-${f}`, value: f in desired ? JSON.stringify(desired[f]) : "", "aria-label": `Desired ${f} (JSON)`, size: 14 });
      const set = h("button", { type: "button", "aria-label": `Set desired ${f}`, onclick: () => patch({ [f]: input.value }, input) }, "Set");
      const remove = f in desired ? h("button", { type: "button", "aria-label": `Remove desired ${f}`, onclick: () => patch({ [f]: "null" }, input) }, "Remove") : null;
      return h("tr", { "data-field": f }, h("th", { scope: "row" }, f), h("td", {}, h("div.row", {}, input, set, remove)),
        h("td.reported", {}, f in reported ? JSON.stringify(reported[f]) : "—"),
        h("td", {}, f in delta ? h("span.badge.warn", {}, "pending") : h("span.badge.ok", {}, "in sync")));
    });
    const newField = h("input", { name: "new-field", placeholder: "field", "aria-label": "New desired field name", size: 10 });
    const newValue = h("input", { name: "new-value", placeholder: "JSON value", "aria-label": "New desired field value (JSON)", size: 14 });
    const conflicts = t.Conflicts || [];
    twin.replaceChildren(...[h("h2", {}, "Twin"),
      table(["Field", "Desired", "Reported", "Delta"], rows, "Twin fields"),
      h("form.row", { "aria-label": "Add a desired field", onsubmit: (e) => { e.preventDefault(); if (newField.value.trim()) patch({ [newField.value.trim()]: newValue.value }, newValue); } },
        newField, newValue, h("button", { type: "submit" }, "Add field")),
      twinMessage,
      conflicts.length ? [h("h2", {}, "Twin conflicts"), table(["Side", "Field", "Value", "Stamp"], conflicts.map((c) => h("tr", {},
        h("td", {}, c.Side), h("td", {}, c.Field), h("td", {}, c.Deleted ? "(deleted)" : JSON.stringify(c.Value)), h("td", {}, c.Stamp))), "Twin conflicts")] : null].flat().filter(Boolean));
    for (const [name, text] of typing) { const input = twin.querySelector(`input[name="${CSS.escape(name)}"]`); if (input) input.value = text; }
    if (focused) twin.querySelector(`input[name="${CSS.escape(focused)}"]`)?.focus();
  };
  const twinMessage = h("div");
  async function patch(fields, input) {
    const body = {};
    for (const [k, text] of Object.entries(fields)) {
      try { body[k] = JSON.parse(text); } catch { twinMessage.replaceChildren(note(`${k}: not JSON (write strings in quotes)`, "bad")); input.setAttribute("aria-invalid", "true"); return; }
    }
    try { await api(`${base}/desired${dq}`, { method: "PATCH", body }); twinMessage.replaceChildren(note("Desired state saved; waiting for the device to report.")); }
    catch (error) { twinMessage.replaceChildren(hidden(error, "(write) this device's desired state")); }
  }
  live(`${base}/twin${dq}`, ({ data }) => renderTwin(data || {}), signal, (e) => twin.replaceChildren(hidden(e, "this device's twin")));
  let windowSeconds = 3600;
  const drawn = h("div");
  const windowSelect = h("select", { "aria-label": "Chart window", onchange: () => { windowSeconds = Number(windowSelect.value); loadChart(); } },
    h("option", { value: 3600 }, "last hour"), h("option", { value: 86400 }, "last day"));
  async function loadChart() {
    try {
      const since = Math.floor(Date.now() / 1000) - windowSeconds;
      const { data } = await api(`${base}/telemetry${qs({ since, limit: 2000, ...dcq(site) })}`, { signal });
      const { svg, legend } = drawChart(data || [], `Telemetry of ${id}`);
      drawn.replaceChildren(svg, legend, h("p.muted", {}, `${(data || []).length} samples`));
    } catch (error) { if (!signal.aborted) drawn.replaceChildren(hidden(error, "this device's telemetry")); }
  }
  chart.replaceChildren(h("h2", {}, "Telemetry"), h("div.row", {}, windowSelect), drawn);
  loadChart();
  const timer = setInterval(loadChart, 5000);
  signal.addEventListener("abort", () => clearInterval(timer));
  return [h("h1", {}, `Device ${id} · ${site}`), head, h("div.row", {}, rotate), rotation, twin, chart];
}

// ---- router ----------------------------------------------------------------------------------

async function whoAmI() {
  if (agent) return agent;
  // Three questions at once (each a round trip): is the token valid (any valid token may read
  // itself; with ACLs off the token API says so), is this a hub (/v1/sites: an edge has no such
  // endpoint, 404; a hub answers or refuses), and which sites (no token needed: at an edge, its own).
  const [self, sites, names] = await Promise.allSettled([
    api("/v1/acl/token/self"), api("/v1/sites"), api("/v1/catalog/datacenters")]);
  if (self.status === "rejected" && self.reason.code !== "acl_disabled") throw self.reason;
  if (self.status === "fulfilled" && !token.get()) throw new ApiError(401, "no_token", "log in with a token");
  const hub = sites.status === "fulfilled" ? sites.value.status !== 404 : sites.reason.status === 403;
  if (names.status === "rejected") throw names.reason;
  agent = { hub, site: (names.value.data || [])[0], sites: names.value.data || [] };
  return agent;
}

function navigation() {
  const site = agent.hub ? null : agent.site;
  nav.replaceChildren(...(agent.hub ? [link("#/", "Fleet"), link("#/kv/global", "Global KV")]
    : [link(`#/site/${site}`, "Site"), link(`#/kv/${site}`, "KV"), link(`#/services/${site}`, "Services"), link(`#/devices/${site}`, "Devices")]));
}

async function route() {
  if (pageAbort) pageAbort.abort();
  pageAbort = new AbortController();
  const signal = pageAbort.signal;
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || "");
  document.getElementById("logout").hidden = !token.get();
  if (parts[0] === "login") { main.replaceChildren(...loginPage()); return; }
  try { await whoAmI(); } catch (error) {
    if (error.status === 403 || error.status === 401) { location.hash = "#/login"; return; }
    main.replaceChildren(note(`The agent did not answer: ${error.message}`, "bad"));
    return;
  }
  navigation();
  const [page, a, b] = parts;
  let content;
  if (!page) content = agent.hub ? fleetPage(signal) : sitePage(signal, agent.site);
  else if (page === "site") content = sitePage(signal, a);
  else if (page === "kv") content = kvPage(signal, a, params);
  else if (page === "services") content = servicesPage(signal, a);
  else if (page === "devices") content = devicesPage(signal, a, params);
  else if (page === "device") content = devicePage(signal, a, b);
  else content = [note("No such page.", "warn")];
  main.replaceChildren(...content.flat().filter(Boolean));
  // The first page drawn with its frame (bench/ui.py reads it as time to first render).
  if (!performance.getEntriesByName("konsul:first-render").length) performance.mark("konsul:first-render");
  document.title = `${main.querySelector("h1")?.textContent || "Konsul"} · Konsul console`;
}

document.getElementById("logout").addEventListener("click", () => { token.clear(); agent = null; location.hash = "#/login"; });
const conn = document.getElementById("conn");
onConnection((state) => { conn.dataset.state = state; conn.textContent = state; conn.title = `Connection to the agent: ${state}`; });
window.addEventListener("hashchange", route);
route();
