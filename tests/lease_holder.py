"""A lease contender in its own process, for the lease tests: a replica is a process, and only
separate processes (own connections, own interpreter) race the way replicas do.

    python lease_holder.py STORE_URL LEASE HOLDER TTL_S RENEW_S

Waits for a line on stdin (the start signal shared by every contender), tries to take the lease
once and prints the outcome as one JSON line ({"token": N, "expires_at": T} or {"token": null}).
A winner then renews every RENEW_S seconds, printing each renewal, until it is killed or its
stdin closes (then it releases the lease); a loser exits.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import asdict

from tuneloop.server.store import open_store


def main(url: str, name: str, holder: str, ttl_s: float, renew_s: float) -> None:
    store = open_store(url)
    sys.stdin.readline()
    lease = store.acquire_lease(name, holder, ttl_s)
    print(json.dumps(asdict(lease) if lease else {"token": None}), flush=True)
    if lease is None:
        return
    stdin_closed = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stdin_closed.set()), daemon=True).start()
    while not stdin_closed.wait(renew_s):
        renewed = store.acquire_lease(name, holder, ttl_s)
        print(json.dumps(asdict(renewed) if renewed else {"token": None}), flush=True)
    store.release_lease(lease)
    store.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
