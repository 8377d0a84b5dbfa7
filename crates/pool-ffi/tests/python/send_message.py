"""Python ctypes loads libpool.so, connects to the C echo server and sends
a message: python3 send_message.py LIBPOOL KEYFILE ADDR SERVERKEY"""
import ctypes
import sys

lib_path, key_file, addr, server_key = sys.argv[1:5]
lib = ctypes.CDLL(lib_path)
P = ctypes.c_void_p
lib.pool_version.restype = ctypes.c_char_p
lib.pool_last_error.restype = ctypes.c_char_p
lib.pool_endpoint_client.restype = P
lib.pool_endpoint_client.argtypes = [ctypes.c_char_p]
lib.pool_connect.restype = P
lib.pool_connect.argtypes = [P, ctypes.c_char_p, ctypes.c_char_p]
lib.pool_stream_open.restype = P
lib.pool_stream_open.argtypes = [P]
lib.pool_stream_write.restype = ctypes.c_ssize_t
lib.pool_stream_write.argtypes = [P, ctypes.c_char_p, ctypes.c_size_t]
lib.pool_stream_read.restype = ctypes.c_ssize_t
lib.pool_stream_read.argtypes = [P, ctypes.c_char_p, ctypes.c_size_t]
for f in ("pool_stream_finish", "pool_stream_free", "pool_session_free", "pool_endpoint_free"):
    getattr(lib, f).argtypes = [P]


def check(ok, what):
    if not ok:
        sys.exit("%s failed: %s" % (what, lib.pool_last_error().decode()))


# A wrong key string is an error with a message, not a crash.
bad = lib.pool_endpoint_client(key_file.encode())
check(bad, "pool_endpoint_client")
assert not lib.pool_connect(bad, addr.encode(), b"not-a-key")
print("wrong key:", lib.pool_last_error().decode())
lib.pool_endpoint_free(bad)

ep = lib.pool_endpoint_client(key_file.encode())
check(ep, "pool_endpoint_client")
s = lib.pool_connect(ep, addr.encode(), server_key.encode())
check(s, "pool_connect")
st = lib.pool_stream_open(s)
check(st, "pool_stream_open")
msg = b"hello from python over POOL " + lib.pool_version()
check(lib.pool_stream_write(st, msg, len(msg)) == len(msg), "pool_stream_write")
check(lib.pool_stream_finish(st) == 0, "pool_stream_finish")
got = b""
buf = ctypes.create_string_buffer(4096)
while True:
    n = lib.pool_stream_read(st, buf, len(buf))
    check(n >= 0, "pool_stream_read")
    if n == 0:
        break
    got += buf.raw[:n]
assert got == msg, (got, msg)
print("echoed:", got.decode())
lib.pool_stream_free(st)
lib.pool_session_free(s)
lib.pool_endpoint_free(ep)
lib.pool_shutdown()
print("OK")
