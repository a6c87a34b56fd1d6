/* session_common.c - what the inbound SMTP/LMTP session and the ODMR
 * session share: reading commands, reply lines, the STARTTLS exchange. */
#include "session.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

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

enum command_read session_read_command(struct io *io, const char *peer,
                                       const char *hostname, char *line,
                                       size_t n, size_t (*limit)(int verb),
                                       unsigned *bad_commands,
                                       struct smtp_cmd *cmd)
{
    long len = io_getline(io, line, n, NULL);
    const char *bad = NULL;
    if (len == IO_TIMEOUT) {
        session_reply(io, peer, "421 4.4.2 %s Error: timeout exceeded", hostname);
        io_flush(io);
        io->status = IO_TIMEOUT;   /* for the disconnect line */
        return COMMAND_END;
    }
    if (len == IO_TOOLONG) {
        io->status = IO_OK;   /* the rest of the line was skipped */
        bad = "500 5.5.6 Line too long";
    } else if (len < 0) {
        return COMMAND_END;
    } else if (strlen(line) != (size_t)len) {
        bad = "500 5.5.2 NUL character in command line";
    } else {
        log_debug("%s < %s", peer,
                  str_casestart(line, "AUTH ") ? "AUTH (redacted)" : line);
        smtp_cmd_parse(line, cmd);
        if ((size_t)len + 2 > limit(cmd->verb))
            bad = "500 5.5.6 Line too long";
    }
    if (bad) {
        session_reply(io, peer, "%s", bad);
        ++*bad_commands;
    }
    if (*bad_commands >= SESSION_MAX_BAD_COMMANDS) {
        session_reply(io, peer, "421 4.7.0 %s Too many errors", hostname);
        io_flush(io);
        return COMMAND_END;
    }
    return bad ? COMMAND_BAD : COMMAND_OK;
}
