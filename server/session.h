/* session.h - entry points of the per-connection sessions.  odmrd forks one
 * process per connection (see docs/architecture.md) and calls one of these
 * in the child; they return when the connection is over. */
#ifndef ODMR_SESSION_H
#define ODMR_SESSION_H

#include <signal.h>
#include <stdbool.h>

#include <openssl/ssl.h>

#include "../common/io.h"
#include "../common/util.h"
#include "conf.h"

struct session_peer {
    int fd;
    char addr[64];        /* printable client address, "unix" for sockets */
    bool stress;          /* the service is above 80% of its budget */
};

/* Inbound SMTP (lmtp = false) or LMTP (lmtp = true) on an accepted socket. */
void smtp_session_run(const struct odmrd_conf *conf, SSL_CTX *tls,
                      const struct session_peer *peer, bool lmtp);

/* The ODMR service (RFC 2645) on an accepted socket. */
void odmr_session_run(const struct odmrd_conf *conf, SSL_CTX *tls,
                      const struct session_peer *peer);

/* Idle timeout of a session that starts while its service is above 80% of
 * its budget (Postfix's stress-dependent smtpd_timeout): idle clients then
 * make room for new ones sooner. */
#define SESSION_STRESS_TIMEOUT 10

/* Starts the session's I/O on peer->fd: `timeout` per wait (or
 * SESSION_STRESS_TIMEOUT under stress, logged), `command_deadline` for
 * every line read with io_getline, and marks the session idle. */
void session_start_io(struct io *io, const struct odmrd_conf *conf,
                      const struct session_peer *peer);

/* One reply line (CRLF added), traced with -d. */
void session_reply(struct io *io, const char *peer, const char *fmt, ...)
    PRINTF_LIKE(3, 4);
/* The same, counting a refusal - a last reply line of 4xx or 5xx, but not
 * the 421 that ends the session - in *refused, which session_read_command
 * holds to SESSION_MAX_BAD_COMMANDS (Postfix's smtpd_hard_error_limit): a
 * client that keeps being refused moves no mail, and must neither hold
 * its slot for ever nor probe without end. */
void session_reply_counted(struct io *io, const char *peer, unsigned *refused,
                           const char *fmt, ...) PRINTF_LIKE(4, 5);

/* After this many bad commands (in the inbound session also refused
 * ones) the client is not talking SMTP, or not usefully: 421. */
#define SESSION_MAX_BAD_COMMANDS 20

/* NOOP, RSET, HELP, VRFY and EHLO/HELO/LHLO move no mail; more than this
 * many without a message between them (Postfix's
 * smtpd_junk_command_limit) and the session is ended, or a client sending
 * NOOP just inside the timeout would hold its slot forever. */
#define SESSION_MAX_JUNK_COMMANDS 100

/* Counts verb in *junk when it is a junk command; true after sending
 * 421 4.7.0 when that makes too many (the session is then over). */
bool session_too_much_junk(struct io *io, const char *peer,
                           const char *hostname, int verb, unsigned *junk);

/* After a timeout or deadline while reading from the client: sends the
 * matching 421 4.4.2 and returns true; false for any other status. */
bool session_timed_out(struct io *io, const char *peer, const char *hostname);

enum command_read { COMMAND_OK, COMMAND_BAD, COMMAND_END };
struct smtp_cmd;
/* Reads one command line into line (n bytes) and parses it into cmd.  A
 * line with a NUL or longer than limit(verb) + CRLF gets its 500 here and
 * counts in *bad_commands (COMMAND_BAD), so that endless junk cannot hold
 * a session.  COMMAND_END: the session is over — connection gone, timeout
 * or command_deadline (421 4.4.2 sent) or too many bad commands (421 4.7.0
 * sent). */
enum command_read session_read_command(struct io *io, const char *peer,
                                       const char *hostname, char *line,
                                       size_t n, size_t (*limit)(int verb),
                                       unsigned *bad_commands,
                                       struct smtp_cmd *cmd);

enum starttls_result { STARTTLS_ON, STARTTLS_REFUSED, STARTTLS_FAILED };
/* The STARTTLS command (RFC 3207): refuses when unavailable, with an
 * argument or with pipelined plaintext behind it (counted in *refused,
 * as session_reply_counted does); otherwise runs the
 * handshake.  After STARTTLS_ON the caller forgets the session state;
 * after STARTTLS_FAILED the connection is unusable. */
enum starttls_result session_starttls(struct io *io, SSL_CTX *ctx, bool tls_on,
                                      const char *arg, const char *peer,
                                      unsigned *refused);

/* Set by the child's SIGTERM handler; sessions finish the transaction they
 * are in and then close with 421. */
extern volatile sig_atomic_t session_stop_requested;
/* True while a session is between transactions: a stop request may then
 * end the process at once without losing anything. */
extern volatile sig_atomic_t session_idle;

#endif
