"""A Python grpcio client for the kv example, written without the Rust
code: health through grpcio-health-checking, the kv calls with their few
protobuf fields encoded by hand.

    kv_client.py ADDR health | put NAME VALUE | get NAME
"""
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, payload):
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def fields(msg):
    """The length-delimited fields of a message: {number: bytes}."""
    out, i = {}, 0
    while i < len(msg):
        key, i = read_varint(msg, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(msg, i)
        elif wire == 2:
            n, i = read_varint(msg, i)
            value, i = msg[i:i + n], i + n
        else:
            raise ValueError(f"unexpected wire type {wire}")
        out[number] = value
    return out


def read_varint(b, i):
    shift = n = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return n, i


def main():
    addr, cmd, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    channel = grpc.insecure_channel(addr)
    grpc.channel_ready_future(channel).result(timeout=15)
    if cmd == "health":
        r = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10)
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
    elif cmd == "put":
        call = channel.unary_unary("/pool.kv.v1.Kv/Put")
        r = call(field(1, args[0].encode()) + field(2, args[1].encode()), timeout=10)
        print(fields(r).get(1, 0))
    elif cmd == "get":
        call = channel.unary_unary("/pool.kv.v1.Kv/Get")
        try:
            r = call(field(1, args[0].encode()), timeout=10)
        except grpc.RpcError as e:
            print(f"error {e.code().name}: {e.details()}")
            sys.exit(1)
        print(fields(r).get(1, b"").decode())
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
