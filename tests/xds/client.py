"""The Python gRPC xDS client driver of crates/sextant/tests/xds_clients.rs.

It opens ONE channel to the target (e.g. `xds:///echo.prod`, resolved by grpcio's built-in xds
resolver from the bootstrap named by GRPC_XDS_BOOTSTRAP) and keeps it for its whole life, so
the test sees what Sextant pushes to a connected client. It reads commands from stdin, one a
line: `N` makes up to N calls of `/echo.Echo/Who` one after another (each with a deadline of
--deadline-ms, or of D ms for a line `N D`; all of them within --batch-seconds) and prints one
JSON line:

    {"calls": 30, "ok": 29, "counts": {"e1": 15, "e2": 14}, "errors": {"UNAVAILABLE": 1},
     "elapsed_ms": 41}

`counts` is per backend id (what the echo server answered), `errors` per status code. With
--calls N it makes one such batch and exits instead. EOF on stdin ends it.
"""

import argparse
import json
import os
import sys
import time

import grpc


def batch(who, n, deadline_s, bound_s):
    counts, errors = {}, {}
    ok = calls = 0
    started = time.monotonic()
    while calls < n and time.monotonic() - started < bound_s:
        calls += 1
        try:
            answer = who(b"", timeout=deadline_s)
        except grpc.RpcError as e:
            code = e.code().name if e.code() is not None else "UNKNOWN"
            errors[code] = errors.get(code, 0) + 1
            # The first error of each kind, with its details, goes to stderr for diagnosis.
            if errors[code] == 1:
                print(f"call error {code}: {e.details()}", file=sys.stderr, flush=True)
            continue
        ok += 1
        backend = answer.decode("utf-8", "replace")
        counts[backend] = counts.get(backend, 0) + 1
    return {
        "calls": calls,
        "ok": ok,
        "counts": counts,
        "errors": errors,
        "elapsed_ms": int((time.monotonic() - started) * 1000),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", required=True, help="e.g. xds:///echo.prod")
    ap.add_argument("--calls", type=int, help="one batch of this many calls, then exit")
    ap.add_argument("--deadline-ms", type=int, default=1000, help="deadline of each call")
    ap.add_argument("--batch-seconds", type=float, default=10.0, help="bound of one batch")
    args = ap.parse_args()
    if args.target.startswith("xds:") and not (
        os.environ.get("GRPC_XDS_BOOTSTRAP") or os.environ.get("GRPC_XDS_BOOTSTRAP_CONFIG")
    ):
        print("FAIL: GRPC_XDS_BOOTSTRAP is not set", flush=True)
        sys.exit(2)

    channel = grpc.insecure_channel(args.target)
    # No (de)serializers: requests and answers are raw bytes.
    who = channel.unary_unary("/echo.Echo/Who")
    deadline_s = args.deadline_ms / 1000.0

    def run(n, deadline):
        print(json.dumps(batch(who, n, deadline, args.batch_seconds)), flush=True)

    if args.calls is not None:
        run(args.calls, deadline_s)
    else:
        print("READY", flush=True)
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            try:
                words = [int(w) for w in line.split()]
                if len(words) not in (1, 2):
                    raise ValueError(line)
            except ValueError:
                print(f"FAIL: not 'CALLS [DEADLINE_MS]': {line!r}", flush=True)
                sys.exit(2)
            run(words[0], words[1] / 1000.0 if len(words) == 2 else deadline_s)
    channel.close()


if __name__ == "__main__":
    main()
