/* data_stream.h - the SMTP DATA stream, read one line (or piece of a
 * long line) at a time.
 *
 * Guarantee: only CRLF "." CRLF ends the data - a "." line after a bare
 * LF, or split off a long line, is message text (the SMTP smuggling
 * defence; SPEC 3.4).  The text handed back is the input with the
 * dot-stuffing undone (RFC 5321 4.5.2) and nothing else changed.  What a
 * later hop could read differently - a CR or LF that is not part of a
 * CRLF pair, a NUL octet - and a message over the size limit are flagged,
 * and the message must then be refused, never passed on.  None of this
 * depends on where the input was split into pieces, as long as every
 * piece not ending in LF is at least DATA_STREAM_PIECE_MIN octets.
 *
 * The stream also finds the header section's end (the first empty line)
 * and counts Received: headers, for loop detection. */
#ifndef ODMR_DATA_STREAM_H
#define ODMR_DATA_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The longest piece of a data line the session looks at at once. */
#define DATA_STREAM_PIECE_MAX 8192
/* A piece cut short (no LF) must hold at least this much: a dot-stuffed
 * ".Received:". */
#define DATA_STREAM_PIECE_MIN 10

struct data_stream {
    bool line_start;      /* next byte begins a line */
    bool after_crlf;      /* ... and the line before ended in CRLF */
    bool prev_cr;         /* last byte seen was CR (a line split at CR) */
    bool in_headers;
    bool bad_eol;         /* a bare CR or LF seen */
    bool nul;             /* a NUL octet seen */
    bool too_big;         /* more than max_size octets of text */
    unsigned received;    /* Received: headers */
    uint64_t size;        /* octets of text (without the dot-stuffing) */
    uint64_t max_size;
};

enum data_part {
    DATA_HEADER,          /* a header, or a piece of one */
    DATA_HEADERS_END,     /* the empty line after the headers */
    DATA_BODY,
};

/* One piece of message text. */
struct data_text {
    const char *p;
    size_t len;
    bool line_start;      /* p begins a line (else it continues one) */
    enum data_part part;
};

void data_stream_init(struct data_stream *d, uint64_t max_size);

/* Takes the next piece of input: a whole line ending in LF (complete) or
 * a piece of a longer one.  Returns true at the end of the data (the
 * piece was the "." line); otherwise *out is the piece's text, which is
 * to be kept only while data_stream_refused() is false. */
bool data_stream_piece(struct data_stream *d, const char *p, size_t len,
                       bool complete, struct data_text *out);

/* True once the message must be refused (bare CR/LF, NUL, size). */
bool data_stream_refused(const struct data_stream *d);

#endif
