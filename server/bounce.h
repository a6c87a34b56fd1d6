/* bounce.h - returning mail to its sender (SPEC 3.6).
 *
 * A bounce is an RFC 3464 delivery status notification
 * (multipart/report; report-type=delivery-status) from
 * MAILER-DAEMON@hostname with the null reverse-path, in three parts: a
 * human explanation, the message/delivery-status report and the original
 * message (message/rfc822; text/rfc822-headers for RET=HDRS).  For an
 * SMTPUTF8 message the RFC 6533 types are used instead
 * (report-type=global-delivery-status, message/global-delivery-status,
 * message/global, message/global-headers).
 *
 * Where it goes:
 *   1. to bounce_relay over SMTP, when one is configured;
 *   2. when the relay is unset, unreachable or says anything but 2xx, and
 *      the sender's domain is hosted here: into that domain's queue
 *      (domain_quota is not applied: a bounce is never dropped for it);
 *   3. when the relay failed for now only (unreachable, a timeout, a 4xx,
 *      the queued data unreadable) and the message has been queued for
 *      less than twice queue_lifetime: nowhere yet (BOUNCE_RETRY), the
 *      message is kept and the bounce tried again later;
 *   4. otherwise nowhere - an error line with the recipients is logged.
 * The DSN is produced as a stream from the queued data file (read with
 * pread, in chunks), once for the relay and, if that fails, once more for
 * the local queue: memory use does not depend on the message size and no
 * temporary copy is needed.
 *
 * Every outcome is logged with the original queue id (Postfix style):
 *   ID: sender non-delivery notification: to=<s>, relay=host[port], 250 ...
 *   ID: sender non-delivery notification: NEWID (queued for DOMAIN; why)
 *   ID: bounce to <s> undeliverable: why; recipients: a@x, b@y
 *   ID: no bounce for null sender; recipients: a@x
 *   ID: to=<a@x>, no non-delivery notification: DSN NOTIFY without FAILURE */
#ifndef ODMR_BOUNCE_H
#define ODMR_BOUNCE_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "conf.h"
#include "envelope.h"
#include "queue.h"

/* Enhanced status codes (RFC 3463) the server itself uses. */
#define BOUNCE_STATUS_EXPIRED "4.4.7"
#define BOUNCE_STATUS_ADMIN "5.0.0"
/* 8-bit data for a receiver without 8BITMIME that cannot be made 7-bit. */
#define BOUNCE_STATUS_NO_CONVERSION "5.6.3"

struct bounce_rcpt {
    const char *addr;        /* the recipient, "local@domain" */
    const char *orcpt;       /* DSN ORCPT as received, "rfc822;xtext", or "" */
    unsigned notify;         /* DSN_NOTIFY_* bits, 0 = not given */
    const char *status;      /* enhanced status code, e.g. "5.1.1";
                                NULL or "" = "5.0.0" */
    const char *diagnostic;  /* "550 5.1.1 no such user" (an SMTP reply:
                                reported as Diagnostic-Code type smtp),
                                other text (type x-odmr), or "" / NULL */
};

enum bounce_result {
    BOUNCE_SENT,        /* the relay accepted the DSN */
    BOUNCE_QUEUED,      /* queued locally for the sender's hosted domain */
    BOUNCE_NOT_NEEDED,  /* null sender, or no recipient asked for a notice */
    BOUNCE_LOGGED,      /* undeliverable: an error line was logged */
    BOUNCE_RETRY,       /* the relay failed for now (3. above), or the DSN
                           had to be queued locally and that failed (disk
                           full, I/O error, account database locked):
                           nothing was sent; keep the message, try later */
};

/* Returns the message (envelope e, data open on data_fd, read from offset
 * 0 with pread whatever the file offset; -1 when the data file is lost:
 * the report then comes without the message) to its sender for
 * recipients r[0..n-1].  Recipients whose NOTIFY was given without
 * FAILURE are left out.  For every result but BOUNCE_RETRY the caller is
 * done with these recipients and removes them (or the message) from the
 * queue.  Blocks for at most a few conf->timeout waits (relay dialogue). */
enum bounce_result bounce_message(const struct odmrd_conf *conf,
                                  struct queue *q, const struct envelope *e,
                                  int data_fd, const struct bounce_rcpt *r,
                                  size_t n);

/* Whether this recipient gets a failure notice: NOTIFY not given (the
 * RFC 3461 default) or given with FAILURE. */
bool bounce_wants_notice(const struct bounce_rcpt *r);

/* Writes the complete DSN (header section and body, CRLF line ends, not
 * dot-stuffed) for the recipients of r[] that want a notice to out_fd.
 * now is used for Date: and the Message-ID.  False when no recipient
 * wants a notice, on a read or write error, or when a field does not fit
 * its line.  (bounce_message uses the same generator; this is the entry
 * point for tests and tools.) */
bool bounce_write_dsn(int out_fd, const char *hostname,
                      const struct envelope *e, int data_fd,
                      const struct bounce_rcpt *r, size_t n, time_t now);

/* Human form of a queueing time, "5 days", "3 hours", "1 minute", "2
 * seconds": the largest unit with a non-zero count (rounded down). */
void bounce_format_age(long seconds, char *buf, size_t n);

#endif
