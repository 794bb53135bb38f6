#!/usr/bin/env python3
"""AUTH flood for bench/run: CLIENTS threads, each from its own loopback address, open a TLS
session to the submissions port and send wrong passwords (three per connection, then a new
connection) for SECONDS. Prints the number of password attempts made."""

import argparse
import base64
import socket
import ssl
import threading
import time


def reply(sock, buf=b""):
    while b"\r\n" not in buf or not any(l[3:4] == b" " for l in buf.split(b"\r\n") if len(l) > 3):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    ctx = ssl.create_default_context(cafile=args.cert)
    stop = time.time() + args.seconds
    attempts = [0] * args.clients

    def flood(n):
        while time.time() < stop:
            try:
                raw = socket.socket()
                raw.bind((f"127.0.1.{n + 1}", 0))
                raw.settimeout(30)
                raw.connect(("127.0.0.1", args.port))
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    reply(s)
                    s.sendall(b"EHLO flood.test\r\n")
                    reply(s)
                    token = base64.b64encode(f"\0user{n}@example.test\0wrong".encode())
                    for _ in range(3):
                        s.sendall(b"AUTH PLAIN " + token + b"\r\n")
                        attempts[n] += 1
                        if not reply(s).startswith(b"535"):
                            break
            except OSError:
                time.sleep(0.05)

    threads = [threading.Thread(target=flood, args=(n,)) for n in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(sum(attempts))


if __name__ == "__main__":
    main()
