#!/usr/bin/env python3
"""A node that cannot prove its key: speaks POOL-RELAY/1 to a relay, claims
KEY (base64url) for INTENT (register | connect:PEERKEY) with a random proof,
and prints what the relay answered as one JSON line: {"type": .., "code": ..,
"message": ..} (or {"type": "closed"}).

  relay_impostor.py HOST PORT KEY INTENT
"""
import base64
import json
import os
import socket
import struct
import sys


def key(tok):
    return base64.urlsafe_b64decode(tok + "=" * (-len(tok) % 4))


def read_msg(s):
    head = b""
    while len(head) < 3:
        b = s.recv(3 - len(head))
        if not b:
            return None
        head += b
    t, n = head[0], struct.unpack(">H", head[1:3])[0]
    body = b""
    while len(body) < n:
        b = s.recv(n - len(body))
        if not b:
            return None
        body += b
    return t, body


def main():
    host, port, claimed, intent = sys.argv[1], int(sys.argv[2]), key(sys.argv[3]), sys.argv[4]
    s = socket.create_connection((host, port), timeout=10)
    hello = b"POOL-RELAY" + b"\x01"
    s.sendall(bytes([1]) + struct.pack(">H", len(hello)) + hello)
    m = read_msg(s)
    assert m and m[0] == 2, m  # CHALLENGE
    if intent == "register":
        tail = b"\x00"
    else:
        tail = b"\x01" + key(intent.split(":", 1)[1])
    body = claimed + os.urandom(32) + tail
    s.sendall(bytes([3]) + struct.pack(">H", len(body)) + body)
    m = read_msg(s)
    if m is None:
        print(json.dumps({"type": "closed"}))
    elif m[0] == 5:
        print(json.dumps({"type": "error", "code": m[1][0], "message": m[1][1:].decode("utf-8", "replace")}))
    else:
        print(json.dumps({"type": m[0]}))
    # Anything forwarded after this would be a failure: send bytes, expect none.
    try:
        s.sendall(b"x" * 4096)
        s.settimeout(1.0)
        extra = s.recv(1)
        print(json.dumps({"forwarded": len(extra)}))
    except OSError:
        print(json.dumps({"forwarded": 0}))


main()
