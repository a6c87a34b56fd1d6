/* session_common.c - what the inbound SMTP/LMTP session and the ODMR
 * session share: the start of the connection with its timeouts, reading
 * commands, reply lines, the STARTTLS exchange. */
#include "session.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "../common/log.h"
#include "../common/smtp.h"

/* Configured seconds as io milliseconds; durations are checked to be > 0
 * by conf.c, but may be longer than an int of milliseconds holds. */
static int seconds_to_ms(long seconds)
{
    if (seconds <= 0)
        return 0;
    return seconds < INT_MAX / 1000 ? (int)(seconds * 1000) : INT_MAX / 1000 * 1000;
}

void session_start_io(struct io *io, const struct odmrd_conf *conf,
                      const struct session_peer *peer)
{
    long timeout = conf->timeout;
    if (peer->stress && timeout > SESSION_STRESS_TIMEOUT) {
        timeout = SESSION_STRESS_TIMEOUT;
        log_info("%s: stress mode: idle timeout %ds", peer->addr,
                 SESSION_STRESS_TIMEOUT);
    }
    io_init(io, peer->fd, seconds_to_ms(timeout));
    io_set_line_deadline(io, seconds_to_ms(conf->command_deadline));
    session_idle = 1;
}

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

void session_reply_counted(struct io *io, const char *peer, unsigned *refused,
                           const char *fmt, ...)
{
    char line[SMTP_REPLY_LINE_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    session_reply(io, peer, "%s", line);
    if ((line[0] == '4' || line[0] == '5') && line[3] != '-' &&
        strncmp(line, "421", 3) != 0)
        ++*refused;
}

enum starttls_result session_starttls(struct io *io, SSL_CTX *ctx, bool tls_on,
                                      const char *arg, const char *peer,
                                      unsigned *refused)
{
    char err[256];
    if (!ctx || tls_on) {
        session_reply_counted(io, peer, refused,
                              "502 5.5.1 STARTTLS not available");
        return STARTTLS_REFUSED;
    }
    if (*arg) {
        session_reply_counted(io, peer, refused,
                              "501 5.5.4 Syntax: STARTTLS");
        return STARTTLS_REFUSED;
    }
    if (io_pending(io)) {
        /* RFC 3207 section 6: plaintext pipelined after STARTTLS would be
         * executed as if it had come over TLS. */
        session_reply_counted(io, peer, refused, "503 5.5.1 No command may "
                              "follow STARTTLS in the same packet");
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

bool session_too_much_junk(struct io *io, const char *peer,
                           const char *hostname, int verb, unsigned *junk)
{
    if (verb != SMTP_NOOP && verb != SMTP_RSET && verb != SMTP_HELP &&
        verb != SMTP_VRFY && verb != SMTP_EHLO && verb != SMTP_HELO &&
        verb != SMTP_LHLO)
        return false;
    if (++*junk <= SESSION_MAX_JUNK_COMMANDS)
        return false;
    log_info("%s: more than %d NOOP/RSET/HELP/VRFY/EHLO/HELO commands "
             "(on the ODMR port also ATRN/XLINGER): session ended", peer,
             SESSION_MAX_JUNK_COMMANDS);
    session_reply(io, peer, "421 4.7.0 %s Too many commands", hostname);
    io_flush(io);
    return true;
}

bool session_timed_out(struct io *io, const char *peer, const char *hostname)
{
    enum io_status st = io->status;
    if (st == IO_TIMEOUT) {
        session_reply(io, peer, "421 4.4.2 %s Error: timeout exceeded", hostname);
    } else if (st == IO_DEADLINE) {
        log_info("%s: command line not complete within command_deadline (%ds)",
                 peer, io->line_deadline_ms / 1000);
        session_reply(io, peer, "421 4.4.2 %s Error: command deadline exceeded",
                      hostname);
    } else {
        return false;
    }
    io_flush(io);
    io->status = st;   /* for the disconnect line, whatever the flush did */
    return true;
}

enum command_read session_read_command(struct io *io, const char *peer,
                                       const char *hostname, char *line,
                                       size_t n, size_t (*limit)(int verb),
                                       unsigned *bad_commands,
                                       struct smtp_cmd *cmd)
{
    long len = io_getline(io, line, n, NULL);
    const char *bad = NULL;
    if (len == IO_TIMEOUT || len == IO_DEADLINE) {
        session_timed_out(io, peer, hostname);
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
        log_info("%s: %d commands refused: session ended", peer,
                 SESSION_MAX_BAD_COMMANDS);
        session_reply(io, peer, "421 4.7.0 %s Too many errors", hostname);
        io_flush(io);
        return COMMAND_END;
    }
    return bad ? COMMAND_BAD : COMMAND_OK;
}
