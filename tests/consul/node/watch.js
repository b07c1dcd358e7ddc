// node-consul (npm `consul`), unchanged, against Sextant's Consul adapter
// (crates/sextant/tests/consul_clients.rs). Usage: node watch.js HOST PORT
//
// A `consul.watch` of health.service("web", passing) — node-consul's blocking-query loop,
// which follows X-Consul-Index and fails on a zero index — must see, in order: the instance
// the test registered through Sextant's native API; then also one registered here through
// Consul's agent API with a passing TTL check; then only the native one again once that check
// is failed. Each change is timed (registration or check update → change event, in ms).
// Exits non-zero with `FAIL: ...` on a wrong sequence or after 60 s.

const Consul = require("consul");

const [host, port] = process.argv.slice(2);
const consul = new Consul({ host, port: Number(port) });

const fail = (msg) => {
  console.error(`FAIL: ${msg}`);
  process.exit(1);
};
setTimeout(() => fail("timed out after 60 s"), 60000).unref();

const ids = (entries) => entries.map((e) => e.Service.ID).sort().join(",");

const steps = [
  { want: "native-1", then: register },
  { want: "native-1,web-n1", then: failCheck },
  { want: "native-1", then: done },
];
let at = 0;
let since = 0;

const watch = consul.watch({
  method: consul.health.service,
  options: { service: "web", passing: true, wait: "20s" },
  backoffFactor: 100,
  backoffMax: 1000,
});
watch.on("error", (err) => fail(`watch error: ${err.message}`));
watch.on("change", (entries, res) => {
  const got = ids(entries);
  const step = steps[at];
  if (got !== step.want) fail(`step ${at}: wanted [${step.want}], got [${got}]`);
  const ms = since ? Date.now() - since : 0;
  console.log(`change ${at}: [${got}] index=${res.headers["x-consul-index"]} after ${ms} ms`);
  at += 1;
  step.then().catch((e) => fail(`step ${at}: ${e.message}`));
});

async function register() {
  since = Date.now();
  await consul.agent.service.register({
    name: "web",
    id: "web-n1",
    address: "127.0.0.1",
    port: 9001,
    tags: ["node"],
    check: { ttl: "30s", status: "passing" },
  });
  const services = await consul.catalog.service.list();
  if (!services.web || !services.web.includes("node")) {
    fail(`catalog services: ${JSON.stringify(services)}`);
  }
}

async function failCheck() {
  since = Date.now();
  await consul.agent.check.fail({ id: "service:web-n1", note: "down" });
}

async function done() {
  watch.end();
  await consul.agent.service.deregister("web-n1");
  console.log("OK");
  process.exit(0);
}
