// The Nacos Node.js SDK (npm `nacos`, a Nacos 1.x HTTP client) subscribing to one service, for
// crates/sextant/tests/nacos_node.rs. Usage: node subscriber.js SERVER:PORT SERVICE
//
// Prints `READY` once subscribed, then one JSON line per change the SDK reports:
// {"t": <ms since epoch>, "hosts": ["ip:port", ...]}. The SDK learns changes by UDP push (it
// lists with `udpPort`) or, without push, by polling every `cacheMillis`. It runs until its
// stdin closes.
//
// The SDK tells the server its own address as `clientIP`, the first non-internal IPv4 of the
// machine; the test keeps everything on loopback by making that 127.0.0.1.
require('address').ip = () => '127.0.0.1';
const { NacosNamingClient } = require('nacos');

const [server, service] = process.argv.slice(2);
const quiet = () => {};
const logger = { info: quiet, debug: quiet, warn: quiet, error: (...a) => console.error(...a) };

(async () => {
  const client = new NacosNamingClient({ serverList: server, namespace: 'public', logger });
  await client.ready();
  client.subscribe(service, hosts => {
    const list = hosts.map(h => `${h.ip}:${h.port}`).sort();
    console.log(JSON.stringify({ t: Date.now(), hosts: list }));
  });
  console.log('READY');
  process.stdin.on('data', () => {});
  process.stdin.on('end', () => process.exit(0));
})().catch(e => {
  console.error('FAIL', e);
  process.exit(1);
});
