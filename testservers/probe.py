"""Wait until a server sends its protocol greeting (an open port is not enough:
Dovecot closes early connections with "disconnected before auth was ready").

usage: probe.py PROTO PORT TIMEOUT   (PROTO: imap pop3 smtp lmtp http; TIMEOUT 0 = one try)
exit 0 when ready, 1 otherwise.  Loopback only."""

import socket
import sys
import time

GREETING = {"imap": b"* OK", "pop3": b"+OK", "smtp": b"220", "lmtp": b"220", "http": b"HTTP/"}


def greets(proto: str, port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(2)
            if proto == "http":
                s.sendall(b"OPTIONS / HTTP/1.0\r\n\r\n")
            return s.recv(64).startswith(GREETING[proto])
    except OSError:
        return False


def main() -> int:
    proto, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    t0 = time.monotonic()
    while not greets(proto, port):
        if time.monotonic() - t0 >= timeout:
            if timeout:
                print(f"  {proto}:{port} not ready after {timeout:g}s", file=sys.stderr)
            return 1
        time.sleep(0.02)
    if timeout:
        print(f"  {proto}:{port} ready after {time.monotonic() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
