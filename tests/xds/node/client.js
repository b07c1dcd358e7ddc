// The Node gRPC xDS client driver of crates/sextant/tests/xds_clients.rs: @grpc/grpc-js with
// @grpc/grpc-js-xds registered, so `xds:///name` targets resolve from the xDS server named by
// the bootstrap in GRPC_XDS_BOOTSTRAP (or GRPC_XDS_BOOTSTRAP_CONFIG).
//
// Same protocol as ../client.py: ONE client (channel) for the whole life of the process; each
// stdin line `N` makes up to N calls of /echo.Echo/Who one after another (each with a deadline
// of --deadline-ms, or of D ms for a line `N D`; all within --batch-seconds) and prints one JSON
// line
//   {"calls": 30, "ok": 29, "counts": {"e1": 15, "e2": 14}, "errors": {"UNAVAILABLE": 1},
//    "elapsed_ms": 41}
// counts per backend id (what the echo server answered), errors per status code. With
// --calls N it makes one batch and exits. EOF on stdin ends it.
'use strict';

const readline = require('readline');
const grpc = require('@grpc/grpc-js');
require('@grpc/grpc-js-xds').register();

function parseArgs(argv) {
  const args = { target: null, calls: null, deadlineMs: 1000, batchSeconds: 10 };
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i];
    const value = argv[i + 1];
    if (value === undefined) throw new Error(`${name} needs a value`);
    i++;
    switch (name) {
      case '--target': args.target = value; break;
      case '--calls': args.calls = Number.parseInt(value, 10); break;
      case '--deadline-ms': args.deadlineMs = Number.parseInt(value, 10); break;
      case '--batch-seconds': args.batchSeconds = Number.parseFloat(value); break;
      default: throw new Error(`unknown argument ${name}`);
    }
  }
  if (!args.target) throw new Error('--target is required');
  return args;
}

const codeNames = Object.fromEntries(
  Object.entries(grpc.status).map(([name, code]) => [code, name]),
);

const identity = (x) => x;

function call(client, deadlineMs) {
  return new Promise((resolve) => {
    const deadline = new Date(Date.now() + deadlineMs);
    client.makeUnaryRequest('/echo.Echo/Who', identity, identity, Buffer.alloc(0), { deadline },
      (err, answer) => resolve({ err, answer }));
  });
}

async function batch(client, n, deadlineMs, batchSeconds) {
  const counts = {};
  const errors = {};
  let ok = 0;
  let calls = 0;
  const started = Date.now();
  while (calls < n && Date.now() - started < batchSeconds * 1000) {
    calls++;
    const { err, answer } = await call(client, deadlineMs);
    if (err) {
      const code = codeNames[err.code] || String(err.code);
      errors[code] = (errors[code] || 0) + 1;
      // The first error of each kind, with its details, goes to stderr for diagnosis.
      if (errors[code] === 1) process.stderr.write(`call error ${code}: ${err.details}\n`);
      continue;
    }
    ok++;
    const backend = answer.toString('utf8');
    counts[backend] = (counts[backend] || 0) + 1;
  }
  return { calls, ok, counts, errors, elapsed_ms: Date.now() - started };
}

// Works around a race in @grpc/grpc-js-xds (seen in 1.14.1, `handleXdsConfig` in
// src/resolver-xds.ts): each xDS config update starts with `await loadXxhashApi()`, and until
// the xxhash WebAssembly module has loaded once, every update starts loading it anew, so two
// updates that arrive within the first few tens of ms of a channel (e.g. EDS with two
// endpoints, then with three) can be applied out of order: the older endpoint list wins and
// stays until the next update. Loading the module before the channel exists keeps updates in
// order. XDS_NODE_NO_PRELOAD=1 turns this off (to see the race).
async function preloadXxhash() {
  if (process.env.XDS_NODE_NO_PRELOAD === '1') return;
  let xxhash;
  try {
    xxhash = require('@grpc/grpc-js-xds/build/src/xxhash');
  } catch (e) {
    process.stderr.write(`note: cannot preload @grpc/grpc-js-xds's xxhash module: ${e.message}\n`);
    return;
  }
  await xxhash.loadXxhashApi();
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  await preloadXxhash();
  if (args.target.startsWith('xds:')
    && !process.env.GRPC_XDS_BOOTSTRAP && !process.env.GRPC_XDS_BOOTSTRAP_CONFIG) {
    console.log('FAIL: GRPC_XDS_BOOTSTRAP is not set');
    process.exit(2);
  }
  const client = new grpc.Client(args.target, grpc.credentials.createInsecure());
  const run = async (n, deadlineMs) =>
    console.log(JSON.stringify(await batch(client, n, deadlineMs, args.batchSeconds)));
  if (args.calls !== null) {
    await run(args.calls, args.deadlineMs);
  } else {
    console.log('READY');
    const lines = readline.createInterface({ input: process.stdin, terminal: false });
    for await (const raw of lines) {
      const line = raw.trim();
      if (!line) continue;
      const words = line.split(/\s+/).map((w) => Number(w));
      if (words.length > 2 || !words.every(Number.isInteger)) {
        console.log(`FAIL: not 'CALLS [DEADLINE_MS]': ${JSON.stringify(line)}`);
        process.exit(2);
      }
      await run(words[0], words.length === 2 ? words[1] : args.deadlineMs);
    }
  }
  client.close();
  // The xDS client keeps its ADS stream (and so the event loop) alive.
  process.exit(0);
}

main().catch((e) => {
  console.log(`FAIL: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
