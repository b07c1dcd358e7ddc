"""A gRPC echo server for the xDS client tests (crates/sextant/tests/xds_clients.rs).

It serves one unary method, `/echo.Echo/Who`, that answers with the server's own id as raw
bytes (identity (de)serializers: no protobuf code generation). It listens on
127.0.0.1:--port (0: a port the kernel picks) and prints `READY <port>` once it serves, so the
test learns the port without a race. It runs until it is killed, or until its stdin closes
(the test's end, even one that died without killing it).
"""

import argparse
import sys
import threading
from concurrent import futures

import grpc


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True, help="0: any free port")
    ap.add_argument("--id", required=True, help="what /echo.Echo/Who answers")
    args = ap.parse_args()

    answer = args.id.encode()

    def who(_request, _context):
        return answer

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    if port == 0:
        print(f"FAIL: cannot listen on 127.0.0.1:{args.port}", flush=True)
        sys.exit(1)
    server.start()
    print(f"READY {port}", flush=True)

    done = threading.Event()

    def watch_stdin():
        # EOF on stdin: whoever started us is gone.
        sys.stdin.read()
        done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    done.wait()
    server.stop(grace=None)


if __name__ == "__main__":
    main()
