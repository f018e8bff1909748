// A device on MQTT.js against a Konsul edge: connect with its token, subscribe to its desired
// state, publish telemetry and a KV write at QoS 1, then wait for a desired state carrying a marker.
// Usage: node mqtt_device.js <port> <device id> <token> <protocol version 4|5> <kv key> <marker>
// Prints one JSON line per step ({"step": ...}); exits 0 once the marked desired state arrived.
const mqtt = require("mqtt");

const [port, deviceId, token, version, kvKey, marker] = process.argv.slice(2);

function say(step, fields = {}) {
  console.log(JSON.stringify({ step, ...fields }));
}

async function main() {
  const client = await mqtt.connectAsync({
    host: "127.0.0.1",
    port: Number(port),
    clientId: deviceId,
    username: deviceId,
    password: token,
    protocolVersion: Number(version),
    clean: true,
    reconnectPeriod: 0,
    connectTimeout: 10000,
  });
  say("connected", { protocolVersion: client.options.protocolVersion });

  const desired = `konsul/v1/devices/${deviceId}/desired`;
  const marked = new Promise((resolve) => {
    client.on("message", (topic, payload, packet) => {
      say("message", { topic, payload: payload.toString(), qos: packet.qos, retain: packet.retain });
      if (topic === desired && payload.toString().includes(marker)) resolve(payload.toString());
    });
  });
  const granted = await client.subscribeAsync(desired, { qos: 1 });
  say("subscribed", { granted: granted.map((grant) => grant.qos) });

  const telemetry = await client.publishAsync(`konsul/v1/devices/${deviceId}/telemetry`,
    JSON.stringify({ temp: 21.5, client: "mqtt.js" }), { qos: 1 });
  say("telemetry acknowledged", { reasonCode: telemetry && telemetry.reasonCode });
  const write = await client.publishAsync(`konsul/v1/kv/${kvKey}`, `written by MQTT.js v${version}`, { qos: 1 });
  say("kv write acknowledged", { reasonCode: write && write.reasonCode });

  const state = await marked;
  say("desired", { payload: state });
  await client.endAsync();
}

const deadline = setTimeout(() => { say("timed out"); process.exit(2); }, 20000);
main().then(() => { clearTimeout(deadline); process.exit(0); }, (error) => {
  say("error", { message: String(error && error.message || error), code: error && error.code });
  process.exit(1);
});
