/* session_common.c - what the inbound SMTP/LMTP session and the ODMR
 * session share: reply lines and the STARTTLS exchange. */
#include "session.h"

#include <stdarg.h>
#include <stdio.h>

#include "../common/log.h"
#include "../common/smtp.h"

void session_reply(struct io *io, const char *peer, const char *fmt, ...)
{
    char line[SMTP_REPLY_LINE_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line - 2, fmt, ap);
    va_end(ap);
    io_puts(io, line);
    io_puts(io, "\r\n");
    log_debug("%s > %s", peer, line);
}

enum starttls_result session_starttls(struct io *io, SSL_CTX *ctx, bool tls_on,
                                      const char *arg, const char *peer)
{
    char err[256];
    if (!ctx || tls_on) {
        session_reply(io, peer, "502 5.5.1 STARTTLS not available");
        return STARTTLS_REFUSED;
    }
    if (*arg) {
        session_reply(io, peer, "501 5.5.4 Syntax: STARTTLS");
        return STARTTLS_REFUSED;
    }
    if (io_pending(io)) {
        /* RFC 3207 section 6: plaintext pipelined after STARTTLS would be
         * executed as if it had come over TLS. */
        session_reply(io, peer,
                      "503 5.5.1 No command may follow STARTTLS in the same packet");
        return STARTTLS_REFUSED;
    }
    session_reply(io, peer, "220 2.0.0 Ready to start TLS");
    if (!io_starttls_server(io, ctx, err, sizeof err)) {
        log_info("%s: %s", peer, err);   /* err names the failure */
        io->status = IO_ERROR;
        return STARTTLS_FAILED;
    }
    return STARTTLS_ON;
}
