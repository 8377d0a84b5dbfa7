/*
 * Test programs for libpool, one binary with several modes:
 *
 *   peer keygen KEYFILE                         prints the public key
 *   peer server KEYFILE CLIENTKEY NSTREAMS BYTES   pattern server
 *   peer echo   KEYFILE CLIENTKEY               echo server (any streams)
 *   peer client KEYFILE ADDR SERVERKEY NSTREAMS BYTES
 *   peer nbclient KEYFILE ADDR SERVERKEY NSTREAMS BYTES   one epoll loop
 *   peer misuse KEYFILE                         bad calls must fail cleanly
 *
 * On each stream both sides send BYTES of a position-dependent pattern
 * (so a lost, duplicated or reordered byte is caught) and check what they
 * receive. Servers print "ADDR a" and "KEY k" first.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pool.h"

#define CHUNK 65536

static void die(const char *what) {
    fprintf(stderr, "FAIL %s: %s (code %d)\n", what, pool_last_error(), (int)pool_last_error_code());
    exit(1);
}

static uint64_t splitmix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* The pattern byte at offset `off` of stream `s`, direction `dir`. */
static void fill(unsigned char *buf, size_t len, uint64_t off, uint64_t seed) {
    for (size_t i = 0; i < len; i++) {
        uint64_t p = off + i;
        buf[i] = (unsigned char)(splitmix((p >> 3) ^ seed) >> (8 * (p & 7)));
    }
}

static uint64_t seed_of(int stream, int dir) { return ((uint64_t)stream << 40) ^ ((uint64_t)dir << 60) ^ 0x5eedULL; }

struct job {
    pool_stream *st;
    int index;
    int dir; /* direction this side sends */
    uint64_t bytes;
    int ok;
};

static void *writer(void *arg) {
    struct job *j = arg;
    unsigned char *buf = malloc(CHUNK);
    uint64_t off = 0;
    while (off < j->bytes) {
        size_t n = j->bytes - off < CHUNK ? (size_t)(j->bytes - off) : CHUNK;
        fill(buf, n, off, seed_of(j->index, j->dir));
        if (pool_stream_write(j->st, buf, n) != (ssize_t)n) die("pool_stream_write");
        off += n;
    }
    if (pool_stream_finish(j->st) != 0) die("pool_stream_finish");
    free(buf);
    j->ok = 1;
    return NULL;
}

static void *reader(void *arg) {
    struct job *j = arg;
    unsigned char *buf = malloc(CHUNK), *want = malloc(CHUNK);
    uint64_t off = 0;
    for (;;) {
        ssize_t n = pool_stream_read(j->st, buf, CHUNK);
        if (n < 0) die("pool_stream_read");
        if (n == 0) break;
        fill(want, (size_t)n, off, seed_of(j->index, !j->dir));
        if (memcmp(buf, want, (size_t)n) != 0) {
            fprintf(stderr, "FAIL stream %d: wrong bytes near offset %llu\n", j->index, (unsigned long long)off);
            exit(1);
        }
        off += (uint64_t)n;
    }
    if (off != j->bytes) {
        fprintf(stderr, "FAIL stream %d: %llu bytes, expected %llu\n", j->index, (unsigned long long)off,
                (unsigned long long)j->bytes);
        exit(1);
    }
    free(buf);
    free(want);
    j->ok = 1;
    return NULL;
}

/* Both directions of `n` streams, a writer and a reader thread each. */
static void run_streams(pool_stream **st, int n, uint64_t bytes, int dir) {
    struct job *w = calloc((size_t)n, sizeof *w), *r = calloc((size_t)n, sizeof *r);
    pthread_t *tw = calloc((size_t)n, sizeof *tw), *tr = calloc((size_t)n, sizeof *tr);
    for (int i = 0; i < n; i++) {
        w[i] = (struct job){st[i], i, dir, bytes, 0};
        r[i] = (struct job){st[i], i, dir, bytes, 0};
        pthread_create(&tw[i], NULL, writer, &w[i]);
        pthread_create(&tr[i], NULL, reader, &r[i]);
    }
    for (int i = 0; i < n; i++) {
        pthread_join(tw[i], NULL);
        pthread_join(tr[i], NULL);
        if (!w[i].ok || !r[i].ok) exit(1);
    }
    free(w);
    free(r);
    free(tw);
    free(tr);
}

static void print_stats(pool_session *s) {
    pool_stats stats;
    if (pool_session_stats(s, &stats) != 0) die("pool_session_stats");
    printf("STATS resumes=%llu rtt_us=%llu sent=%llu received=%llu\n", (unsigned long long)stats.resumes,
           (unsigned long long)stats.rtt_us, (unsigned long long)stats.stream_bytes_sent,
           (unsigned long long)stats.stream_bytes_received);
}

static pool_endpoint *bind_server(const char *key, const char *client_key) {
    pool_trust *t = pool_trust_new();
    if (!t || pool_trust_allow(t, client_key) != 0) die("pool_trust_allow");
    pool_endpoint *ep = pool_endpoint_bind("127.0.0.1:0", key, t);
    if (!ep) die("pool_endpoint_bind");
    pool_trust_free(t);
    printf("ADDR %s\nKEY %s\n", pool_endpoint_local_addr(ep), pool_endpoint_public_key(ep));
    fflush(stdout);
    return ep;
}

static int server(const char *key, const char *client_key, int n, uint64_t bytes) {
    pool_endpoint *ep = bind_server(key, client_key);
    pool_session *s = pool_accept(ep);
    if (!s) die("pool_accept");
    pool_stream **st = calloc((size_t)n, sizeof *st);
    for (int i = 0; i < n; i++)
        if (!(st[i] = pool_stream_accept(s))) die("pool_stream_accept");
    run_streams(st, n, bytes, 1);
    print_stats(s);
    for (int i = 0; i < n; i++) pool_stream_free(st[i]);
    free(st);
    pool_session_free(s);
    pool_endpoint_free(ep);
    pool_shutdown();
    printf("OK\n");
    return 0;
}

static void *echo_stream(void *arg) {
    pool_stream *st = arg;
    char buf[4096];
    ssize_t n;
    while ((n = pool_stream_read(st, buf, sizeof buf)) > 0)
        if (pool_stream_write(st, buf, (size_t)n) != n) break;
    pool_stream_finish(st);
    pool_stream_free(st);
    return NULL;
}

static _Noreturn void echo(const char *key, const char *client_key) {
    pool_endpoint *ep = bind_server(key, client_key);
    for (;;) {
        pool_session *s = pool_accept(ep);
        if (!s) die("pool_accept");
        pool_stream *st;
        while ((st = pool_stream_accept(s))) {
            pthread_t t;
            pthread_create(&t, NULL, echo_stream, st);
            pthread_detach(t);
        }
        pool_session_free(s);
    }
}

static int client(const char *key, const char *addr, const char *server_key, int n, uint64_t bytes) {
    pool_endpoint *ep = pool_endpoint_client(key);
    if (!ep) die("pool_endpoint_client");
    pool_session *s = pool_connect(ep, addr, server_key);
    if (!s) die("pool_connect");
    pool_stream **st = calloc((size_t)n, sizeof *st);
    for (int i = 0; i < n; i++)
        if (!(st[i] = pool_stream_open(s))) die("pool_stream_open");
    run_streams(st, n, bytes, 0);
    print_stats(s);
    for (int i = 0; i < n; i++) pool_stream_free(st[i]);
    free(st);
    pool_session_free(s);
    pool_endpoint_free(ep);
    pool_shutdown();
    printf("OK\n");
    return 0;
}

/* ---- non-blocking: every stream from one epoll loop, one thread ---- */

struct nb {
    pool_stream *st;
    int index, fd;
    uint64_t sent, received;
    int finished, eof;
};

static int nbclient(const char *key, const char *addr, const char *server_key, int n, uint64_t bytes) {
    pool_endpoint *ep = pool_endpoint_client(key);
    if (!ep) die("pool_endpoint_client");
    pool_session *s = pool_connect(ep, addr, server_key);
    if (!s) die("pool_connect");
    int ep_fd = epoll_create1(0);
    struct nb *all = calloc((size_t)n, sizeof *all);
    unsigned char *buf = malloc(CHUNK), *want = malloc(CHUNK);
    for (int i = 0; i < n; i++) {
        all[i].st = pool_stream_open(s);
        if (!all[i].st) die("pool_stream_open");
        all[i].index = i;
        all[i].fd = pool_stream_set_nonblocking(all[i].st);
        if (all[i].fd < 0) die("pool_stream_set_nonblocking");
        if (pool_stream_fd(all[i].st) != all[i].fd) die("pool_stream_fd");
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &all[i]};
        if (epoll_ctl(ep_fd, EPOLL_CTL_ADD, all[i].fd, &ev) != 0) {
            perror("epoll_ctl");
            return 1;
        }
    }
    /* Kick every stream once: write until EAGAIN. */
    int done = 0;
    struct epoll_event evs[64];
    long wakeups = 0;
    for (int pass = 0; done < n; pass++) {
        int k;
        struct nb *ready[64];
        if (pass == 0) {
            k = 0; /* first pass: visit all streams below */
        } else {
            k = epoll_wait(ep_fd, evs, 64, 10000);
            if (k <= 0) {
                fprintf(stderr, "FAIL epoll_wait timed out with %d/%d streams done\n", done, n);
                return 1;
            }
            wakeups++;
            for (int e = 0; e < k; e++) ready[e] = evs[e].data.ptr;
        }
        int count = pass == 0 ? n : k;
        for (int e = 0; e < count; e++) {
            struct nb *x = pass == 0 ? &all[e] : ready[e];
            if (x->eof && x->finished) continue;
            while (!x->finished) {
                if (x->sent == bytes) {
                    if (pool_stream_finish(x->st) != 0) die("pool_stream_finish");
                    x->finished = 1;
                    break;
                }
                size_t len = bytes - x->sent < CHUNK ? (size_t)(bytes - x->sent) : CHUNK;
                fill(buf, len, x->sent, seed_of(x->index, 0));
                ssize_t w = pool_stream_write(x->st, buf, len);
                if (w < 0) {
                    if (errno == EAGAIN && pool_last_error_code() == POOL_EAGAIN) break;
                    die("pool_stream_write");
                }
                x->sent += (uint64_t)w;
            }
            while (!x->eof) {
                ssize_t r = pool_stream_read(x->st, buf, CHUNK);
                if (r < 0) {
                    if (errno == EAGAIN) break;
                    die("pool_stream_read");
                }
                if (r == 0) {
                    x->eof = 1;
                    break;
                }
                fill(want, (size_t)r, x->received, seed_of(x->index, 1));
                if (memcmp(buf, want, (size_t)r) != 0) {
                    fprintf(stderr, "FAIL stream %d: wrong bytes near %llu\n", x->index,
                            (unsigned long long)x->received);
                    return 1;
                }
                x->received += (uint64_t)r;
            }
            if (x->eof && x->finished) {
                if (x->received != bytes) {
                    fprintf(stderr, "FAIL stream %d: %llu bytes\n", x->index, (unsigned long long)x->received);
                    return 1;
                }
                epoll_ctl(ep_fd, EPOLL_CTL_DEL, x->fd, NULL);
                done++;
            }
        }
    }
    printf("NB streams=%d wakeups=%ld\n", n, wakeups);
    print_stats(s);
    for (int i = 0; i < n; i++) pool_stream_free(all[i].st);
    free(all);
    free(buf);
    free(want);
    close(ep_fd);
    pool_session_free(s);
    pool_endpoint_free(ep);
    pool_shutdown();
    printf("OK\n");
    return 0;
}

/* ---- bad use ---- */

static int failures;

#define EXPECT_FAIL(call, code)                                                                     \
    do {                                                                                            \
        long long r_ = (long long)(intptr_t)(call);                                                 \
        int bad_ = (r_ != -1 && r_ != 0) || pool_last_error_code() != (code) || !*pool_last_error(); \
        printf("%s %s -> %s\n", bad_ ? "WRONG" : "ok", #call, pool_last_error());                   \
        failures += bad_;                                                                           \
    } while (0)

static int misuse(const char *key) {
    char pub[POOL_PUBLIC_KEY_LEN + 1];
    char buf[16];
    EXPECT_FAIL(pool_endpoint_client(NULL), POOL_EINVAL);
    EXPECT_FAIL(pool_endpoint_bind(NULL, key, NULL), POOL_EINVAL);
    EXPECT_FAIL(pool_endpoint_client("/nonexistent/key"), POOL_EKEY);
    EXPECT_FAIL(pool_key_public(key, pub, 3), POOL_EINVAL);
    EXPECT_FAIL(pool_stream_read(NULL, buf, sizeof buf), POOL_EINVAL);
    EXPECT_FAIL(pool_stream_write(NULL, buf, sizeof buf), POOL_EINVAL);
    EXPECT_FAIL(pool_stream_open(NULL), POOL_EINVAL);
    EXPECT_FAIL(pool_accept(NULL), POOL_EINVAL);
    EXPECT_FAIL(pool_session_stats(NULL, NULL), POOL_EINVAL);
    EXPECT_FAIL(pool_stream_read((pool_stream *)(uintptr_t)0x1234, buf, sizeof buf), POOL_EBADHANDLE);

    /* A key file others can read is refused. */
    char loose[4096];
    snprintf(loose, sizeof loose, "%s.loose", key);
    unlink(loose);
    if (pool_key_generate(loose) != 0) die("pool_key_generate");
    EXPECT_FAIL(pool_key_generate(loose), POOL_EIO); /* never overwritten */
    chmod(loose, 0644);
    EXPECT_FAIL(pool_endpoint_client(loose), POOL_EKEY);

    pool_trust *t = pool_trust_new();
    EXPECT_FAIL(pool_trust_allow(t, "not-a-key"), POOL_EKEY);
    EXPECT_FAIL(pool_trust_allow(t, NULL), POOL_EINVAL);
    EXPECT_FAIL(pool_trust_allow_file(t, "/nonexistent/authorized"), POOL_EIO);

    /* A server and a client, to have real sessions and streams. */
    if (pool_key_public(key, pub, sizeof pub) != POOL_PUBLIC_KEY_LEN) die("pool_key_public");
    if (pool_trust_allow(t, pub) != 0) die("pool_trust_allow");
    pool_endpoint *srv = pool_endpoint_bind("127.0.0.1:0", key, t);
    if (!srv) die("pool_endpoint_bind");
    pool_trust_free(t);
    EXPECT_FAIL(pool_trust_free(t), POOL_EBADHANDLE); /* double free */
    pool_endpoint *cli = pool_endpoint_client(key);
    if (!cli) die("pool_endpoint_client");
    EXPECT_FAIL(pool_endpoint_local_addr(cli), POOL_EINVAL);
    EXPECT_FAIL(pool_accept(cli), POOL_EINVAL);
    const char *addr = pool_endpoint_local_addr(srv);
    EXPECT_FAIL(pool_connect(cli, addr, "AAAA"), POOL_EKEY);
    EXPECT_FAIL(pool_connect(cli, addr, NULL), POOL_EINVAL);
    EXPECT_FAIL(pool_connect(cli, "not an address", pub), POOL_ENET);
    pool_session *s = pool_connect(cli, addr, pub);
    if (!s) die("pool_connect");
    pool_stream *st = pool_stream_open(s);
    if (!st) die("pool_stream_open");
    EXPECT_FAIL(pool_stream_read(st, NULL, 4), POOL_EINVAL);
    EXPECT_FAIL(pool_stream_fd(st), POOL_EINVAL); /* still blocking */
    EXPECT_FAIL(pool_session_stats(s, NULL), POOL_EINVAL);
    EXPECT_FAIL(pool_stream_read((pool_stream *)s, buf, sizeof buf), POOL_EBADHANDLE); /* wrong kind */
    if (pool_stream_write(st, "x", 1) != 1) die("pool_stream_write");
    if (pool_stream_finish(st) != 0) die("pool_stream_finish");
    EXPECT_FAIL(pool_stream_write(st, "x", 1), POOL_ECLOSED); /* after finish */
    if (pool_stream_free(st) != 0) die("pool_stream_free");
    EXPECT_FAIL(pool_stream_read(st, buf, sizeof buf), POOL_EBADHANDLE); /* use after free */
    EXPECT_FAIL(pool_stream_write(st, buf, sizeof buf), POOL_EBADHANDLE);
    EXPECT_FAIL(pool_stream_finish(st), POOL_EBADHANDLE);
    EXPECT_FAIL(pool_stream_free(st), POOL_EBADHANDLE); /* double free */
    pool_session_free(s);
    EXPECT_FAIL(pool_stream_open(s), POOL_EBADHANDLE);
    EXPECT_FAIL(pool_session_free(s), POOL_EBADHANDLE);
    pool_endpoint_free(cli);
    EXPECT_FAIL(pool_connect(cli, addr, pub), POOL_EBADHANDLE);
    EXPECT_FAIL(pool_endpoint_free(cli), POOL_EBADHANDLE);
    pool_endpoint_free(srv);
    if (pool_stream_free(NULL) != 0 || pool_session_free(NULL) != 0) die("free(NULL)");
    pool_shutdown();
    printf("%s misuse failures=%d\n", failures ? "FAIL" : "OK", failures);
    return failures != 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 3 && !strcmp(argv[1], "keygen")) {
        char pub[POOL_PUBLIC_KEY_LEN + 1];
        if (pool_key_generate(argv[2]) != 0) die("pool_key_generate");
        if (pool_key_public(argv[2], pub, sizeof pub) < 0) die("pool_key_public");
        printf("%s\n", pub);
        return 0;
    }
    if (argc == 6 && !strcmp(argv[1], "server"))
        return server(argv[2], argv[3], atoi(argv[4]), strtoull(argv[5], NULL, 10));
    if (argc == 4 && !strcmp(argv[1], "echo")) echo(argv[2], argv[3]);
    if (argc == 7 && !strcmp(argv[1], "client"))
        return client(argv[2], argv[3], argv[4], atoi(argv[5]), strtoull(argv[6], NULL, 10));
    if (argc == 7 && !strcmp(argv[1], "nbclient"))
        return nbclient(argv[2], argv[3], argv[4], atoi(argv[5]), strtoull(argv[6], NULL, 10));
    if (argc == 3 && !strcmp(argv[1], "misuse")) return misuse(argv[2]);
    fprintf(stderr, "usage: see the comment at the top of peer.c (libpool %s)\n", pool_version());
    return 2;
}
