/* data_stream.c - the SMTP DATA stream (data_stream.h). */
#include "data_stream.h"

#include <string.h>
#include <strings.h>

void data_stream_init(struct data_stream *d, uint64_t max_size)
{
    *d = (struct data_stream){.line_start = true, .after_crlf = true,
                              .in_headers = true, .max_size = max_size};
}

bool data_stream_refused(const struct data_stream *d)
{
    return d->bad_eol || d->nul || d->too_big;
}

/* Flags CR and LF that are not part of a CRLF pair.  A CR at the end of
 * a piece is judged by the first octet of the next. */
static void check_line_ends(struct data_stream *d, const char *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (p[i] == '\n') {
            bool after_cr = i ? p[i - 1] == '\r' : d->prev_cr;
            if (!after_cr)
                d->bad_eol = true;
        } else if (p[i] == '\r' && i + 1 < len && p[i + 1] != '\n') {
            d->bad_eol = true;
        }
    }
    if (len && d->prev_cr && p[0] != '\n')
        d->bad_eol = true;
    d->prev_cr = len ? p[len - 1] == '\r' : d->prev_cr;
}

/* Which part of the message a piece starting a line (or not) is, and
 * what it does to the header count and state. */
static enum data_part classify(struct data_stream *d, const char *p, size_t len)
{
    if (!d->in_headers)
        return DATA_BODY;
    if (!d->line_start)
        return DATA_HEADER;
    if ((len == 2 && p[0] == '\r') || (len == 1 && p[0] == '\n')) {
        d->in_headers = false;
        return DATA_HEADERS_END;
    }
    if (len >= 9 && !strncasecmp(p, "Received:", 9))
        d->received++;
    return DATA_HEADER;
}

bool data_stream_piece(struct data_stream *d, const char *p, size_t len,
                       bool complete, struct data_text *out)
{
    if (d->after_crlf && complete && len == 3 && !memcmp(p, ".\r\n", 3))
        return true;
    bool starts = d->line_start;
    if (starts && len && p[0] == '.') {   /* undo dot-stuffing */
        p++;
        len--;
    }
    bool crlf_end = complete && ((len >= 2 && p[len - 2] == '\r') ||
                                 (len == 1 && d->prev_cr));
    check_line_ends(d, p, len);
    /* RFC 2045 2.8 allows no NUL in 8bit data and BINARYMIME is not
     * offered; a later hop that strips NULs would see "\r\n\0.\r\n" as
     * the end of data. */
    if (memchr(p, '\0', len))
        d->nul = true;
    *out = (struct data_text){p, len, starts, classify(d, p, len)};
    d->line_start = complete;
    d->after_crlf = crlf_end;
    d->size += len;
    if (d->size > d->max_size)
        d->too_big = true;
    return false;
}
