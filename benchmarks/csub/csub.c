/* csub: N WebSocket subscribers in one epoll loop, for benchmarks/pg_e2e.py.
 *
 * A Python client costs several microseconds per received frame (a Go one as much, at one
 * frame per wake-up), and on a 2-core machine that CPU is taken from the gateway and
 * PostgreSQL being measured. This client reads every ready socket per epoll_wait and scans
 * the bytes for the `{"t":<ns>,` that starts each event's record (the table's first column),
 * at about a microsecond per frame.
 *
 * Usage: csub HOST PORT PATH TOKEN COUNT BULK OUTFILE
 * Markers in t: > 0 a measured row (latency = now - t, stored), -1 end of the steady phase,
 * 0 a bulk row, anything else ignored. Output lines on stdout, as the Python subscribers role:
 *   READY                                       every client subscribed
 *   {"steady_file": OUTFILE, "n": N, "closed": C}   latencies as little-endian int64 ns
 *   {"bulk_done": D, "bulk_last_ns": T, "closed": C}
 * Build: gcc -O2 -o csub csub.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TAIL 64
#define MAX_SAMPLES (16u << 20)

typedef struct {
    int fd;
    int subscribed, steady_done, closed;
    long bulk;
    size_t tail_len;
    char tail[TAIL];
} conn_t;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "csub: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void send_all(int fd, const char *buf, size_t len) {
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) die("write");
        buf += n;
        len -= (size_t)n;
    }
}

static void send_text(int fd, const char *text) {
    unsigned char frame[512];
    size_t n = strlen(text), i;
    unsigned char mask[4] = {0x12, 0x34, 0x56, 0x78};
    if (n >= 126) { fprintf(stderr, "csub: message too long\n"); exit(2); }
    frame[0] = 0x81;
    frame[1] = 0x80 | (unsigned char)n;
    memcpy(frame + 2, mask, 4);
    for (i = 0; i < n; i++) frame[6 + i] = (unsigned char)text[i] ^ mask[i % 4];
    send_all(fd, (const char *)frame, 6 + n);
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: csub HOST PORT PATH TOKEN COUNT BULK OUTFILE\n");
        return 2;
    }
    const char *host = argv[1], *path = argv[3], *token = argv[4], *outfile = argv[7];
    int port = atoi(argv[2]), count = atoi(argv[5]);
    long bulk = atol(argv[6]);
    conn_t *conns = calloc((size_t)count, sizeof(conn_t));
    int64_t *samples = malloc(MAX_SAMPLES * sizeof(int64_t));
    size_t nsamples = 0;
    char req[4096], buf[1 << 16];
    int ep = epoll_create1(0), i;
    if (!conns || !samples || ep < 0) die("setup");

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &addr.sin_addr);
    int reqlen = snprintf(req, sizeof req,
                          "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                          "Authorization: Bearer %s\r\n\r\n", path, host, port, token);
    for (i = 0; i < count; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        send_all(fd, req, (size_t)reqlen);
        /* the 101 response: read up to the blank line, byte by byte (set-up only) */
        char resp[2048];
        size_t got = 0;
        while (got < sizeof resp - 1) {
            ssize_t n = read(fd, resp + got, 1);
            if (n <= 0) die("handshake");
            got += (size_t)n;
            if (got >= 4 && memcmp(resp + got - 4, "\r\n\r\n", 4) == 0) break;
        }
        resp[got] = 0;
        if (strncmp(resp, "HTTP/1.1 101", 12) != 0) {
            fprintf(stderr, "csub: upgrade refused: %.200s\n", resp);
            return 2;
        }
        send_text(fd, "{\"type\":\"subscribe\",\"channel\":\"postgres:ticks\"}");
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        conns[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    }

    int subscribed = 0, steady_done = 0, closed = 0, bulk_done = 0, steady_printed = 0;
    int64_t bulk_last = 0;
    struct epoll_event events[256];
    static const char marker[] = "{\"t\":";
    static const char sub_marker[] = "\"type\":\"subscribed\"";
    for (;;) {
        int n = epoll_wait(ep, events, 256, 1000);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int k = 0; k < n; k++) {
            conn_t *c = &conns[events[k].data.u32];
            for (;;) {
                memcpy(buf, c->tail, c->tail_len);
                ssize_t r = read(c->fd, buf + c->tail_len, sizeof buf - c->tail_len - 1);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    if (!c->closed) { c->closed = 1; closed++; close(c->fd); }
                    break;
                }
                if (r < 0) break;
                int64_t now = now_ns();
                size_t len = c->tail_len + (size_t)r;
                /* keep the last 4 bytes (a marker cut in two), or from a marker whose number
                   may go on in the next read; never a marker already counted */
                size_t keep_from = len >= sizeof marker - 2 ? len - (sizeof marker - 2) : 0;
                buf[len] = 0;
                if (!c->subscribed && memmem(buf, len, sub_marker, sizeof sub_marker - 1)) {
                    c->subscribed = 1;
                    if (++subscribed == count) { puts("READY"); fflush(stdout); }
                }
                char *p = buf, *end = buf + len;
                while ((p = memmem(p, (size_t)(end - p), marker, sizeof marker - 1)) != NULL) {
                    char *stop;
                    long long t = strtoll(p + sizeof marker - 1, &stop, 10);
                    if (stop == end) { keep_from = (size_t)(p - buf); break; }
                    if (*stop == ',') {
                        if (t > 0) {
                            if (nsamples < MAX_SAMPLES) samples[nsamples++] = now - t;
                        } else if (t == -1) {
                            if (!c->steady_done) { c->steady_done = 1; steady_done++; }
                        } else if (t == 0) {
                            if (++c->bulk == bulk) { bulk_done++; if (now > bulk_last) bulk_last = now; }
                        }
                    }
                    p = stop;
                    if ((size_t)(p - buf) > keep_from) keep_from = (size_t)(p - buf);
                }
                c->tail_len = len - keep_from;
                if (c->tail_len > TAIL) c->tail_len = 0;
                memmove(c->tail, buf + keep_from, c->tail_len);
                /* a short read drained the socket (epoll is level-triggered: more data wakes
                   us again), so skip the read that would only return EAGAIN */
                if ((size_t)r < sizeof buf - 1 - TAIL) break;
            }
        }
        int live = count - closed;
        if (!steady_printed && subscribed == count && steady_done >= live) {
            FILE *f = fopen(outfile, "wb");
            if (!f) die("fopen");
            fwrite(samples, sizeof(int64_t), nsamples, f);
            fclose(f);
            printf("{\"steady_file\": \"%s\", \"n\": %zu, \"closed\": %d}\n", outfile, nsamples, closed);
            fflush(stdout);
            steady_printed = 1;
        }
        if (steady_printed && bulk_done >= live) {
            printf("{\"bulk_done\": %d, \"bulk_last_ns\": %lld, \"closed\": %d}\n", bulk_done,
                   (long long)bulk_last, closed);
            fflush(stdout);
            return 0;
        }
    }
}
