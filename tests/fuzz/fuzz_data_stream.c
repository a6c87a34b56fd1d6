/* fuzz_data_stream.c - libFuzzer harness for server/data_stream.c, the
 * SMTP DATA stream that decides where a message sent to port 25 ends and
 * whether it is refused (make fuzz).
 *
 * The first input octet picks the piece size long lines are cut at, the
 * second the size limit; the rest is what the client sends after 354.
 * The stream is fed as the session feeds it and compared with a model
 * that works on whole lines of the whole input:
 *   - the data ends exactly at the first "." CRLF line that follows a
 *     line ending in CRLF (or the 354), or not at all;
 *   - the flags: bare CR or LF, NUL, size over the limit, exactly as the
 *     model finds them in the octets before the end;
 *   - a message not refused comes out as its input without the
 *     dot-stuffing, split at the first empty line into headers and body,
 *     with as many header lines and Received: headers as the model counts;
 *   - all of that is the same when long lines are cut at another size. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* data_stream.c belongs to odmrd, not to the common sources the fuzz rule
 * links: compiled in here. */
#include "../../server/data_stream.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct result {
    bool ended, bad_eol, nul, too_big;
    size_t used;           /* input octets, with the "." line */
    unsigned received, header_lines;
    uint64_t size;
    char *headers, *body;  /* kept text, when not refused */
    size_t hlen, blen;
    int headers_end;
};

static void must(bool property)
{
    if (!property)
        abort();
}

static void append(char *buf, size_t *n, const char *p, size_t len)
{
    memcpy(buf + *n, p, len);
    *n += len;
}

static void result_init(struct result *r, size_t cap)
{
    memset(r, 0, sizeof *r);
    r->headers = malloc(cap + 1);
    r->body = malloc(cap + 1);
    if (!r->headers || !r->body)
        abort();
}

static void result_free(struct result *r)
{
    free(r->headers);
    free(r->body);
}

static void keep(struct result *r, const struct data_text *t)
{
    if (t->part == DATA_HEADER) {
        append(r->headers, &r->hlen, t->p, t->len);
        r->header_lines += t->line_start;
    } else if (t->part == DATA_HEADERS_END) {
        must(t->line_start);
        r->headers_end++;
    } else {
        append(r->body, &r->blen, t->p, t->len);
    }
}

/* As smtp_session.c feeds the stream: to an LF, or piece_max octets. */
static void run_stream(const char *in, size_t len, size_t piece_max,
                       uint64_t max, struct result *r)
{
    struct data_stream d;
    size_t off = 0;
    data_stream_init(&d, max);
    while (off < len && !r->ended) {
        const char *lf = memchr(in + off, '\n', len - off);
        size_t n = lf ? (size_t)(lf - (in + off)) + 1 : len - off;
        bool complete = lf != NULL && n <= piece_max;
        if (n > piece_max)
            n = piece_max;
        struct data_text t;
        r->ended = data_stream_piece(&d, in + off, n, complete, &t);
        off += n;
        if (!r->ended && !data_stream_refused(&d))
            keep(r, &t);
    }
    r->used = off;
    r->bad_eol = d.bad_eol;
    r->nul = d.nul;
    r->too_big = d.too_big;
    r->received = d.received;
    r->size = d.size;
}

/* The model's faults in the octets in[0, end). */
static void model_faults(const char *in, size_t end, struct result *r)
{
    for (size_t i = 0; i < end; i++) {
        if (in[i] == '\n' && (i == 0 || in[i - 1] != '\r'))
            r->bad_eol = true;
        if (in[i] == '\r' && i + 1 < end && in[i + 1] != '\n')
            r->bad_eol = true;
        if (in[i] == '\0')
            r->nul = true;
    }
}

/* The model: whole lines of the whole input. */
static void run_model(const char *in, size_t len, uint64_t max,
                      struct result *r)
{
    bool after_crlf = true, in_headers = true;
    size_t off = 0;
    while (off < len) {
        const char *lf = memchr(in + off, '\n', len - off);
        size_t n = lf ? (size_t)(lf - (in + off)) + 1 : len - off;
        const char *line = in + off;
        if (after_crlf && n == 3 && !memcmp(line, ".\r\n", 3)) {
            r->ended = true;
            off += n;
            break;
        }
        after_crlf = lf && n >= 2 && line[n - 2] == '\r';
        off += n;
        if (line[0] == '.') {
            line++;
            n--;
        }
        r->size += n;
        if (in_headers && ((n == 2 && line[0] == '\r') ||
                           (n == 1 && line[0] == '\n'))) {
            in_headers = false;
            r->headers_end++;
        } else if (in_headers) {
            append(r->headers, &r->hlen, line, n);
            r->header_lines++;
            if (n >= 9 && !strncasecmp(line, "Received:", 9))
                r->received++;
        } else {
            append(r->body, &r->blen, line, n);
        }
    }
    r->used = off;
    model_faults(in, r->ended ? off - 3 : off, r);
    r->too_big = r->size > max;
}

static bool same_text(const char *a, size_t alen, const char *b, size_t blen)
{
    return alen == blen && !memcmp(a, b, alen);
}

static void compare(const struct result *a, const struct result *b)
{
    must(a->ended == b->ended);
    must(a->used == b->used);
    must(a->bad_eol == b->bad_eol);
    must(a->nul == b->nul);
    must(a->too_big == b->too_big);
    must(a->size == b->size);
    must(a->received == b->received);
    if (a->bad_eol || a->nul || a->too_big)
        return;
    must(a->headers_end == b->headers_end);
    must(a->header_lines == b->header_lines);
    must(same_text(a->headers, a->hlen, b->headers, b->hlen));
    must(same_text(a->body, a->blen, b->body, b->blen));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t piece_max = DATA_STREAM_PIECE_MIN + data[0] % 64;
    uint64_t max = (uint64_t)data[1] * 16;
    const char *in = (const char *)data + 2;
    size_t len = size - 2;
    struct result cut, whole, model;
    result_init(&cut, len);
    result_init(&whole, len);
    result_init(&model, len);
    run_stream(in, len, piece_max, max, &cut);
    run_stream(in, len, DATA_STREAM_PIECE_MAX, max, &whole);
    run_model(in, len, max, &model);
    must(!model.ended || !memcmp(in + model.used - 3, ".\r\n", 3));
    compare(&cut, &model);
    compare(&whole, &model);
    result_free(&cut);
    result_free(&whole);
    result_free(&model);
    return 0;
}
