/* envelope.h - the per-domain envelope of a queued message and its on-disk
 * serialisation.
 *
 * File format (text, one record per line, fields separated by TAB, which
 * cannot occur in an RFC 5321 address or in xtext):
 *   V 1                 format version, first line
 *   I <queue id>
 *   D <domain>          the queue this envelope belongs to
 *   T <arrival, unix seconds>
 *   F <sender>          "" for the null sender
 *   Z <size of the data file in bytes>
 *   E <envid xtext>     optional
 *   N <FULL|HDRS>       optional (DSN RET)
 *   B <7BIT|8BITMIME>   optional
 *   U                   SMTPUTF8 was requested
 *   C <client address>
 *   H <helo name>
 *   A <attempts> <last attempt unix seconds>
 *   R <address>\t<notify bits>\t<orcpt or ->\t<last reply or ->
 *   .                   end marker: a file without it is incomplete
 * Unknown record letters are an error: an older daemon must not silently
 * drop information a newer one wrote. */
#ifndef ODMR_ENVELOPE_H
#define ODMR_ENVELOPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#include "../common/addr.h"
#include "../common/smtp.h"

#define QID_MAX 32
#define HELO_MAX 255
#define CLIENT_ADDR_MAX 64
#define LAST_REPLY_MAX 512

struct env_rcpt {
    char addr[ADDR_MAX + 1];
    unsigned notify;                     /* DSN_NOTIFY_* */
    char orcpt[SMTP_ORCPT_MAX + 1];
    char last_reply[LAST_REPLY_MAX + 1]; /* last delivery attempt's reply */
};

struct envelope {
    char id[QID_MAX];
    char domain[ADDR_DOMAIN_MAX + 1];
    time_t arrival;
    char sender[ADDR_MAX + 1];
    uint64_t size;
    char envid[SMTP_ENVID_MAX + 1];
    enum smtp_ret ret;
    enum smtp_body body;
    bool smtputf8;
    char client[CLIENT_ADDR_MAX];
    char helo[HELO_MAX + 1];
    unsigned attempts;
    time_t last_attempt;
    size_t nrcpt, cap;
    struct env_rcpt *rcpt;               /* heap, nrcpt entries */
};

void envelope_init(struct envelope *e);
void envelope_free(struct envelope *e);
/* Appends a recipient; false on allocation failure or past max. */
bool envelope_add_rcpt(struct envelope *e, const char *addr, unsigned notify,
                       const char *orcpt, size_t max);
/* Removes recipient i, keeping order. */
void envelope_del_rcpt(struct envelope *e, size_t i);

bool envelope_write(FILE *f, const struct envelope *e);
/* Reads an envelope; false with a reason in err if it is malformed or
 * incomplete. */
bool envelope_read(FILE *f, struct envelope *e, char *err, size_t n);

#endif
