"""A Python grpcio server speaking the kv example's protocol (Put, Get),
with the standard health service from grpcio-health-checking.

    kv_server.py   (listens on 127.0.0.1, a free port; prints "port N")
"""
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kv_client import field, fields, varint

store = {}
lock = threading.Lock()


def put(request, context):
    f = fields(request)
    with lock:
        store[f.get(1, b"")] = f.get(2, b"")
        n = len(store)
    return bytes([0x08]) + varint(n)


def get(request, context):
    name = fields(request).get(1, b"")
    with lock:
        value = store.get(name)
    if value is None:
        context.abort(grpc.StatusCode.NOT_FOUND, f"{name.decode()} is not set")
    return field(1, value)


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "Put": grpc.unary_unary_rpc_method_handler(put),
        "Get": grpc.unary_unary_rpc_method_handler(get),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("pool.kv.v1.Kv", handlers),))
    h = health.HealthServicer()
    h.set("", health_pb2.HealthCheckResponse.SERVING)
    h.set("pool.kv.v1.Kv", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
