/* test_data_stream.c - unit tests for server/data_stream.c: where the
 * DATA stream ends, dot-stuffing, the faults that refuse a message, the
 * header section and the Received: count. */
#include <stdio.h>
#include <string.h>

#include "../../server/data_stream.h"
#include "check.h"

struct fed {
    struct data_stream d;
    bool ended;
    size_t used;            /* input octets up to and with the "." line */
    char headers[512], body[512];
    size_t hlen, blen;
    int headers_end;        /* DATA_HEADERS_END pieces seen */
    int header_starts;      /* DATA_HEADER pieces that begin a line */
};

static void keep(char *buf, size_t *n, size_t cap, const struct data_text *t)
{
    if (*n + t->len < cap) {
        memcpy(buf + *n, t->p, t->len);
        *n += t->len;
        buf[*n] = '\0';
    }
}

/* Feeds the input as the session does: up to an LF, or piece_max octets
 * of a longer line. */
static void feed(struct fed *f, const char *in, size_t piece_max, uint64_t max)
{
    size_t len = strlen(in), off = 0;
    memset(f, 0, sizeof *f);
    data_stream_init(&f->d, max);
    while (off < len && !f->ended) {
        const char *lf = memchr(in + off, '\n', len - off);
        size_t n = lf ? (size_t)(lf - (in + off)) + 1 : len - off;
        bool complete = lf != NULL && n <= piece_max;
        if (n > piece_max)
            n = piece_max;
        struct data_text t;
        f->ended = data_stream_piece(&f->d, in + off, n, complete, &t);
        off += n;
        if (f->ended || data_stream_refused(&f->d))
            continue;
        if (t.part == DATA_HEADER) {
            keep(f->headers, &f->hlen, sizeof f->headers, &t);
            f->header_starts += t.line_start;
        } else if (t.part == DATA_HEADERS_END) {
            f->headers_end++;
        } else {
            keep(f->body, &f->blen, sizeof f->body, &t);
        }
    }
    f->used = off;
}

static void test_plain_message(void)
{
    struct fed f;
    const char *m = "Subject: hi\r\nTo: a@b\r\n\r\nline one\r\n..dot\r\n.\r\nQUIT\r\n";
    feed(&f, m, DATA_STREAM_PIECE_MAX, 1000);
    CHECK(f.ended);
    CHECK(f.used == strlen(m) - strlen("QUIT\r\n"));
    CHECK_STR(f.headers, "Subject: hi\r\nTo: a@b\r\n");
    CHECK(f.header_starts == 2);
    CHECK(f.headers_end == 1);
    CHECK_STR(f.body, "line one\r\n.dot\r\n");
    CHECK(!data_stream_refused(&f.d));
    CHECK(f.d.size == strlen("Subject: hi\r\nTo: a@b\r\n\r\nline one\r\n.dot\r\n"));
}

static void test_empty_message(void)
{
    struct fed f;
    feed(&f, ".\r\n", DATA_STREAM_PIECE_MAX, 1000);
    CHECK(f.ended);
    CHECK(f.used == 3);
    CHECK(f.d.size == 0);
    CHECK(f.d.in_headers);
}

/* SMTP smuggling: "\n.\r\n" and "\r\n.\n" are not the end of the data,
 * and the message that holds them is refused. */
static void test_smuggling(void)
{
    struct fed f;
    feed(&f, "a: b\r\n\r\nx\n.\r\nMAIL FROM:<e@vil>\r\n.\r\n", 64, 1000);
    CHECK(f.ended);
    CHECK(f.d.bad_eol);
    CHECK(data_stream_refused(&f.d));
    CHECK(f.used == strlen("a: b\r\n\r\nx\n.\r\nMAIL FROM:<e@vil>\r\n.\r\n"));
    feed(&f, "a: b\r\n\r\nx\r\n.\nMAIL FROM:<e@vil>\r\n.\r\n", 64, 1000);
    CHECK(f.ended);
    CHECK(f.d.bad_eol);
    feed(&f, "a: b\r\n\r\nx\r.\r\n.\r\n", 64, 1000);
    CHECK(f.ended);
    CHECK(f.used == strlen("a: b\r\n\r\nx\r.\r\n.\r\n"));
    CHECK(f.d.bad_eol);
    feed(&f, "a: b\r\n\r\nok\r\n", 64, 1000);
    CHECK(!f.ended);
}

/* A line longer than a piece: its pieces are not lines, so a "." piece
 * in the middle of one ends nothing. */
static void test_long_line(void)
{
    char m[256];
    struct fed f;
    memset(m, 'x', 20);
    memcpy(m + 20, ".\r\nrest\r\n.\r\n", sizeof ".\r\nrest\r\n.\r\n");
    feed(&f, m, 20, 1000);
    CHECK(f.ended);
    CHECK(f.used == strlen(m));
    CHECK_STR(f.headers, "xxxxxxxxxxxxxxxxxxxx.\r\nrest\r\n");
    CHECK(f.header_starts == 2);
    CHECK(!data_stream_refused(&f.d));
    /* a CRLF split between two pieces is still a CRLF */
    memset(m, 'y', 19);
    memcpy(m + 19, "\r\n.\r\n", sizeof "\r\n.\r\n");
    feed(&f, m, 20, 1000);
    CHECK(f.ended);
    CHECK(!f.d.bad_eol);
    CHECK(f.hlen == 21);
}

static void test_faults(void)
{
    struct fed f;
    struct data_stream d;
    struct data_text t;
    data_stream_init(&d, 1000);
    CHECK(!data_stream_piece(&d, "x\0y\r\n", 5, true, &t));
    CHECK(d.nul);
    CHECK(data_stream_refused(&d));
    data_stream_init(&d, 1000);
    CHECK(!data_stream_piece(&d, "a\rb\r\n", 5, true, &t));
    CHECK(d.bad_eol);
    feed(&f, "0123456789\r\n0123456789\r\n.\r\n", 64, 20);
    CHECK(f.ended);
    CHECK(f.d.too_big);
    CHECK(!f.d.bad_eol);
    feed(&f, "0123456789\r\n0123456789\r\n.\r\n", 64, 24);
    CHECK(!f.d.too_big);
}

static void test_received_count(void)
{
    struct fed f;
    feed(&f, "Received: a\r\nreceived:b\r\n\tReceived: folded\r\n"
             "X-Received: no\r\n\r\nReceived: body\r\n.\r\n", 64, 1000);
    CHECK(f.ended);
    CHECK(f.d.received == 2);
    CHECK(f.header_starts == 4);
    CHECK_STR(f.body, "Received: body\r\n");
}

/* A bare LF empty line also ends the headers (the message is refused for
 * it, but the milters must see where the body starts). */
static void test_lf_ends_headers(void)
{
    struct data_stream d;
    struct data_text t;
    data_stream_init(&d, 1000);
    CHECK(!data_stream_piece(&d, "a: b\r\n", 6, true, &t));
    CHECK(t.part == DATA_HEADER && t.line_start);
    CHECK(!data_stream_piece(&d, "\n", 1, true, &t));
    CHECK(t.part == DATA_HEADERS_END);
    CHECK(!d.in_headers);
    CHECK(!data_stream_piece(&d, "b\r\n", 3, true, &t));
    CHECK(t.part == DATA_BODY);
}

int main(void)
{
    test_plain_message();
    test_empty_message();
    test_smuggling();
    test_long_line();
    test_faults();
    test_received_count();
    test_lf_ends_headers();
    CHECK_DONE();
}
