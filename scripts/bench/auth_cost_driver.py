"""Drives N registrations + N reads over one keep-alive HTTP/1.1 connection, with an optional
bearer token; used to count the server's instructions per request under callgrind."""
import http.client, json, sys
port, n, token = int(sys.argv[1]), int(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else "")
c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
h = {"content-type": "application/json"}
if token:
    h["authorization"] = "Bearer " + token
body = json.dumps({"host": "10.0.0.1", "port": 80})
bad = 0
for i in range(n):
    c.request("PUT", f"/v1/namespaces/bench/services/s{i % 50}/instances/i{i}", body, h)
    r = c.getresponse(); r.read()
    bad += r.status != 200
    c.request("GET", f"/v1/namespaces/bench/services/s{i % 50}", headers=h)
    r = c.getresponse(); r.read()
    bad += r.status != 200
print(f"{2*n} requests, {bad} not 200")
