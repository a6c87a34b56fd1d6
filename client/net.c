/* net.c - connecting with a timeout, sending command lines, reading
 * replies, and the -vv protocol trace. */
#include "fetch.h"

#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Replies are 512 octets by RFC 5321; real servers send a little more
 * now and then, so be lenient up to this before calling it malformed. */
#define REPLY_LINE_READ_MAX 2048
/* What one trace line shows of a long line. */
#define TRACE_SHOW_MAX 300

static bool tracing;

void trace_set(bool on)
{
    tracing = on;
}

bool trace_on(void)
{
    return tracing;
}

void trace_line(const char *who, bool out, const char *line)
{
    char clean[TRACE_SHOW_MAX + 1];
    size_t i;

    if (!tracing)
        return;
    /* Never let peer data put escape sequences on an operator's tty. */
    for (i = 0; line[i] && i < TRACE_SHOW_MAX; i++) {
        unsigned char ch = (unsigned char)line[i];
        clean[i] = (ch < 32 || ch == 127) ? '?' : (char)ch;
    }
    clean[i] = '\0';
    fprintf(stderr, "odmr-fetch: %s %s %s%s\n", who, out ? "<<" : ">>",
            clean, line[i] ? " [...]" : "");
}

/* ---- lines and replies --------------------------------------------- */

bool net_send(struct io *io, const char *who, const char *line,
              const char *shown)
{
    trace_line(who, true, shown ? shown : line);
    return io_puts(io, line) && io_puts(io, "\r\n");
}

/* The reply's lines; after the first, the rest within the timeout. */
static int reply_lines(struct io *io, const char *who, struct smtp_reply *r,
                       bool *malformed)
{
    char line[REPLY_LINE_READ_MAX];

    for (;;) {
        long n = io_getline(io, line, sizeof line, NULL);
        if (n == IO_TOOLONG || (n >= 0 && strlen(line) != (size_t)n)) {
            *malformed = true;
            return IO_ERROR;
        }
        if (n < 0)
            return (int)n;
        trace_line(who, false, line);
        int rc = smtp_reply_feed(r, line);
        if (rc < 0) {
            *malformed = true;
            return IO_ERROR;
        }
        if (rc == 1)
            return IO_OK;
        if (r->nlines == 1)
            io_deadline_within_timeout(io);
    }
}

int net_reply(struct io *io, const char *who, struct smtp_reply *r,
              bool *malformed)
{
    int64_t outer = io->deadline;

    *malformed = false;
    smtp_reply_init(r);
    int st = reply_lines(io, who, r, malformed);
    io_set_deadline(io, outer);
    return st;
}
