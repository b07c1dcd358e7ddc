// One real eureka-js-client, driven by crates/sextant/tests/eureka_js.rs.
//
// Usage: node client.js '<json>' where the JSON names the server (`host`, `port`,
// `servicePath`), this client's instance (`app`, `id`, `instancePort`, `lease` seconds) and
// intervals (`heartbeatMs`, `fetchMs`), and the apps to report (`watch`). It registers,
// heartbeats and fetches the registry as any application would, and prints one JSON line per
// event on stdout: `registered`, `heartbeat`, `registry` (the instance ids of each watched app
// in its cache, which holds UP instances only), `started`, `stopped` and `log` (the client's
// own warnings). A line `stop` on stdin stops it (the client deregisters), then it exits.
'use strict';

const { Eureka } = require('eureka-js-client');

const cfg = JSON.parse(process.argv[2]);
const emit = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);
const quiet = () => {};
const logger = {
  debug: quiet,
  info: quiet,
  warn: (...a) => emit({ event: 'log', level: 'warn', message: a.map(String).join(' ') }),
  error: (...a) => emit({ event: 'log', level: 'error', message: a.map(String).join(' ') }),
};

const client = new Eureka({
  logger,
  instance: {
    app: cfg.app,
    instanceId: cfg.id,
    hostName: `${cfg.id}.local`,
    ipAddr: '127.0.0.1',
    port: { $: cfg.instancePort, '@enabled': true },
    vipAddress: cfg.app.toLowerCase(),
    statusPageUrl: `http://127.0.0.1:${cfg.instancePort}/info`,
    dataCenterInfo: {
      '@class': 'com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo',
      name: 'MyOwn',
    },
    leaseInfo: { durationInSecs: cfg.lease, renewalIntervalInSecs: 1 },
    metadata: { team: 'pay', 'build.sha': 'abc123' },
  },
  eureka: {
    host: cfg.host,
    port: cfg.port,
    servicePath: cfg.servicePath,
    heartbeatInterval: cfg.heartbeatMs,
    registryFetchInterval: cfg.fetchMs,
    maxRetries: 1,
    requestRetryDelay: 100,
  },
});

client.on('registered', () => emit({ event: 'registered' }));
client.on('heartbeat', () => emit({ event: 'heartbeat' }));
client.on('registryUpdated', () => {
  const apps = {};
  for (const app of cfg.watch) {
    apps[app] = (client.cache.app[app.toUpperCase()] || []).map((i) => i.instanceId);
  }
  emit({ event: 'registry', apps });
});

client.start((err) => emit({ event: 'started', error: err ? String(err) : null }));

let buffered = '';
process.stdin.on('data', (chunk) => {
  buffered += chunk;
  if (buffered.includes('stop')) {
    client.stop((err) => {
      emit({ event: 'stopped', error: err ? String(err) : null });
      process.exit(0);
    });
  }
});
