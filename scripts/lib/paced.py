#!/usr/bin/env python3
"""A paced, timestamped byte stream, for path-change tests and benchmarks.

  paced.py serve HOST PORT INTERVAL_MS STOPFILE
      Accepts connections; on each, sends 64 KiB chunks every INTERVAL_MS
      until STOPFILE exists, then shuts its side and prints one JSON line:
      {"chunks": N, "sha256": ...}.
  paced.py fetch HOST PORT
      Connects, reads until EOF, prints one JSON line: bytes, chunks,
      sha256, lost and duplicated chunks (by index), corrupt chunks, and
      delivery delays: each chunk carries its index and send time
      (CLOCK_MONOTONIC, shared by every process and network namespace of
      the host), so the receiver knows how late each chunk arrived.
      "stall_ms" is the largest delay minus the median delay: the longest
      the stream stood still beyond its usual pace.
"""
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time

CHUNK = 65536
HEAD = struct.Struct(">Qd")


def body(i):
    seed = hashlib.sha256(struct.pack(">Q", i)).digest()
    return (seed * (CHUNK // 32))[: CHUNK - HEAD.size]


def serve(host, port, interval_ms, stopfile):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(16)
    print("listening", flush=True)

    def one(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        h = hashlib.sha256()
        i = 0
        next_t = time.monotonic()
        try:
            while not os.path.exists(stopfile):
                block = HEAD.pack(i, time.monotonic()) + body(i)
                c.sendall(block)
                h.update(block)
                i += 1
                next_t += interval_ms / 1000.0
                delay = next_t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            c.shutdown(socket.SHUT_WR)
            while c.recv(65536):
                pass
        except OSError as e:
            print(json.dumps({"error": str(e), "chunks": i}), flush=True)
            return
        finally:
            c.close()
        print(json.dumps({"chunks": i, "sha256": h.hexdigest()}), flush=True)

    while True:
        c, _ = ls.accept()
        threading.Thread(target=one, args=(c,), daemon=True).start()


def fetch(host, port):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = chunks = lost = dup = corrupt = 0
    expect = 0
    delays = []
    while True:
        got = 0
        while got < CHUNK:
            n = s.recv_into(view[got:], CHUNK - got)
            if n == 0:
                break
            got += n
        now = time.monotonic()
        if got == 0:
            break
        total += got
        h.update(view[:got])
        if got < CHUNK:
            corrupt += 1
            break
        i, sent = HEAD.unpack_from(buf)
        if i < expect:
            dup += 1
        elif i > expect:
            lost += i - expect
        if bytes(view[HEAD.size:]) != body(i):
            corrupt += 1
        expect = max(expect, i + 1)
        chunks += 1
        delays.append((now - sent) * 1000.0)
    s.close()
    delays_sorted = sorted(delays) or [0.0]
    median = delays_sorted[len(delays_sorted) // 2]
    print(
        json.dumps(
            {
                "bytes": total,
                "chunks": chunks,
                "sha256": h.hexdigest(),
                "lost": lost,
                "duplicated": dup,
                "corrupt": corrupt,
                "median_delay_ms": round(median, 3),
                "max_delay_ms": round(delays_sorted[-1], 3),
                "stall_ms": round(delays_sorted[-1] - median, 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "fetch":
        fetch(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
