// node-consul's event calls against a Konsul agent: fire, list, and a blocking list woken by a fire.
// Usage: node events.js <port>; prints one JSON line with what it saw.
const Consul = require("consul");

// Consul's event-list index, from the newest event's ID (agent/event_endpoint.go uuidToUint64).
function idToIndex(id) {
  const hex = id.replace(/-/g, "");
  return (BigInt("0x" + hex.slice(0, 16)) ^ BigInt("0x" + hex.slice(16))).toString();
}

async function main() {
  const consul = new Consul({ host: "127.0.0.1", port: Number(process.argv[2]) });
  const first = await consul.event.fire({ name: "node-deploy", payload: "v1" });
  const listed = await consul.event.list({ name: "node-deploy" });
  const index = idToIndex(listed[listed.length - 1].ID);
  const blocked = consul.event.list({ name: "node-deploy", index, wait: "30s" });
  const second = await consul.event.fire({ name: "node-deploy", payload: Buffer.from("v2") });
  const woken = await blocked;
  console.log(JSON.stringify({
    first: first.ID,
    listed: listed.map((e) => [e.ID, String(e.Payload)]),
    second: second.ID,
    woken: woken.map((e) => [e.ID, String(e.Payload)]),
  }));
}

main().catch((error) => { console.error(error); process.exit(1); });
