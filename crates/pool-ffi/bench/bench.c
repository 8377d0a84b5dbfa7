/*
 * scripts/bench-cabi's C side.
 *   bench server KEY CLIENTKEY          prints ADDR/KEY; per stream, the first
 *                                       byte picks: 'S' sink (then "k" at EOF),
 *                                       'E' echo
 *   bench send KEY ADDR SKEY MIB        one stream, MIB MiB: prints MiB/s
 *   bench rtt  KEY ADDR SKEY N          N round trips of 32 bytes: prints µs each
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pool.h"

static void die(const char *w) {
    fprintf(stderr, "bench: %s: %s\n", w, pool_last_error());
    exit(1);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void *serve(void *arg) {
    pool_stream *st = arg;
    static __thread char buf[1 << 16];
    char mode;
    if (pool_stream_read(st, &mode, 1) != 1) goto out;
    ssize_t n;
    if (mode == 'S') {
        while ((n = pool_stream_read(st, buf, sizeof buf)) > 0) {
        }
        pool_stream_write(st, "k", 1);
    } else {
        while ((n = pool_stream_read(st, buf, sizeof buf)) > 0)
            if (pool_stream_write(st, buf, (size_t)n) != n) break;
    }
out:
    pool_stream_finish(st);
    pool_stream_free(st);
    return NULL;
}

static void *serve_session(void *arg) {
    pool_session *s = arg;
    pool_stream *st;
    while ((st = pool_stream_accept(s))) {
        pthread_t t;
        pthread_create(&t, NULL, serve, st);
        pthread_detach(t);
    }
    pool_session_free(s);
    return NULL;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 4 && !strcmp(argv[1], "server")) {
        pool_trust *t = pool_trust_new();
        if (pool_trust_allow(t, argv[3]) != 0) die("trust");
        pool_endpoint *ep = pool_endpoint_bind("127.0.0.1:0", argv[2], t);
        if (!ep) die("bind");
        printf("ADDR %s\nKEY %s\n", pool_endpoint_local_addr(ep), pool_endpoint_public_key(ep));
        pool_session *s;
        while ((s = pool_accept(ep))) {
            pthread_t th;
            pthread_create(&th, NULL, serve_session, s);
            pthread_detach(th);
        }
        die("accept");
    }
    if (argc != 6) {
        fprintf(stderr, "usage: bench server|send|rtt ...\n");
        return 2;
    }
    pool_endpoint *ep = pool_endpoint_client(argv[2]);
    if (!ep) die("client");
    pool_session *s = pool_connect(ep, argv[3], argv[4]);
    if (!s) die("connect");
    pool_stream *st = pool_stream_open(s);
    if (!st) die("open");
    long n = atol(argv[5]);
    if (!strcmp(argv[1], "send")) {
        size_t chunk = 1 << 16;
        char *buf = calloc(1, chunk);
        if (pool_stream_write(st, "S", 1) != 1) die("write");
        double t0 = now();
        for (long i = 0; i < n * 16; i++)
            if (pool_stream_write(st, buf, chunk) != (ssize_t)chunk) die("write");
        pool_stream_finish(st);
        char k;
        if (pool_stream_read(st, &k, 1) != 1) die("read");
        printf("send %.1f MiB/s\n", (double)n / (now() - t0));
        free(buf);
    } else {
        char msg[32] = {0}, got[32];
        if (pool_stream_write(st, "E", 1) != 1) die("write");
        for (int warm = 0; warm < 2; warm++) {
            double t0 = now();
            for (long i = 0; i < n; i++) {
                if (pool_stream_write(st, msg, sizeof msg) != (ssize_t)sizeof msg) die("write");
                size_t have = 0;
                while (have < sizeof got) {
                    ssize_t r = pool_stream_read(st, got + have, sizeof got - have);
                    if (r <= 0) die("read");
                    have += (size_t)r;
                }
            }
            if (warm) printf("rtt %.1f us\n", (now() - t0) / (double)n * 1e6);
        }
    }
    pool_stream_free(st);
    pool_session_free(s);
    pool_endpoint_free(ep);
    pool_shutdown();
    return 0;
}
