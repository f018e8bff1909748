// node-consul's session calls against a Konsul edge: create, info, list, node, renew, a lock taken and
// released with kv.set acquire/release (never two holders), and destroy releasing what a session holds.
// Usage: node sessions.js <port>; prints one JSON line with what it saw.
const Consul = require("consul");

async function main() {
  const consul = new Consul({ host: "127.0.0.1", port: Number(process.argv[2]) });
  const key = "locks/node-consul";
  const a = (await consul.session.create({ name: "node-a", ttl: "30s", behavior: "release", lockdelay: "0s" })).ID;
  const b = (await consul.session.create({ name: "node-b", ttl: "30s", lockdelay: "0s" })).ID;
  const info = await consul.session.info(a);
  const listed = (await consul.session.list()).map((s) => s.ID);
  const onNode = (await consul.session.node(info.Node)).map((s) => s.ID);
  const renewed = await consul.session.renew(a);
  const seen = { a, b, info: { Name: info.Name, TTL: info.TTL, Behavior: info.Behavior, Node: info.Node } };
  seen.listed = listed;
  seen.onNode = onNode;
  seen.renewed = renewed.map((s) => s.ID);
  seen.acquiredByA = await consul.kv.set({ key, value: "held by a", acquire: a });
  // A refused acquire answers false; node-consul hands that on as undefined, so compare with true.
  seen.acquiredByB = (await consul.kv.set({ key, value: "held by b", acquire: b })) === true;
  const held = await consul.kv.get(key);
  seen.held = { Session: held.Session, LockIndex: held.LockIndex, Value: String(held.Value) };
  seen.releasedByB = (await consul.kv.set({ key, value: "not b's", release: b })) === true;
  seen.releasedByA = await consul.kv.set({ key, value: "free", release: a });
  const free = await consul.kv.get(key);
  seen.free = { Session: free.Session || null, Value: String(free.Value) };
  seen.reacquiredByB = await consul.kv.set({ key, value: "held by b", acquire: b });
  seen.destroyedB = await consul.session.destroy(b);
  const after = await consul.kv.get(key);
  seen.afterDestroy = { Session: after.Session || null, LockIndex: after.LockIndex };
  seen.infoAfterDestroy = (await consul.session.info(b)) || null;
  seen.destroyedA = await consul.session.destroy(a);
  seen.left = (await consul.session.list()).map((s) => s.ID);
  console.log(JSON.stringify(seen));
}

main().catch((error) => { console.error(error); process.exit(1); });
