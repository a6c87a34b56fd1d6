/* deliver.c - what the delivery targets share: reply lines, relaying a
 * local server's reply to odmrd, shell quoting, and picking the kind. */
#include "target.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* A relayed reply text is cut here: odmrd logs it and puts it in DSNs,
 * and the whole reply line must stay within 512 octets. */
#define RELAY_TEXT_MAX 400

void reply_set(struct reply *r, int code, const char *fmt, ...)
{
    va_list ap;

    if (code < 200 || code > 599)
        code = 451;   /* a bug of ours must not become a weird reply */
    r->code = code;
    r->line[0] = (char)('0' + code / 100);
    r->line[1] = (char)('0' + code / 10 % 10);
    r->line[2] = (char)('0' + code % 10);
    r->line[3] = ' ';
    va_start(ap, fmt);
    vsnprintf(r->line + 4, sizeof r->line - 4, fmt, ap);
    va_end(ap);
}

static bool code_expected(int code, bool want_354)
{
    if (want_354 && code == 354)
        return true;
    int cls = code / 100;
    return cls == 2 || cls == 4 || cls == 5;
}

void reply_relay(struct reply *r, const struct smtp_reply *from, bool want_354)
{
    char first[RELAY_TEXT_MAX + 1];
    size_t len = strcspn(from->text, "\n");

    if (len > RELAY_TEXT_MAX)
        len = RELAY_TEXT_MAX;
    memcpy(first, from->text, len);   /* smtp_reply_feed cleaned it */
    first[len] = '\0';

    int code = from->code;
    if (!code_expected(code, want_354)) {
        reply_set(r, 451, "4.3.0 Unexpected reply from the local mail "
                          "system: %d %s", code, first);
        return;
    }
    if (code == 421) {
        /* The local server is closing its connection; ours to odmrd
         * stays open, so this is an ordinary temporary failure. */
        if (from->enhanced[0])
            reply_set(r, 451, "%s", first);
        else
            reply_set(r, 451, "4.3.0 %s", first);
        return;
    }
    if (from->enhanced[0] || code == 354)
        reply_set(r, code, "%s", first);
    else
        reply_set(r, code, "%d.0.0 %s", code / 100, first);
}

bool shell_quote_append(char *buf, size_t n, size_t *len, const char *s)
{
    size_t o = *len;

    /* '...' keeps everything literal except ' itself, written '\'' */
    if (o + 1 >= n)
        return false;
    buf[o++] = '\'';
    for (; *s; s++) {
        const char *piece = *s == '\'' ? "'\\''" : NULL;
        size_t plen = piece ? 4 : 1;
        if (o + plen + 1 >= n)
            return false;
        if (piece)
            memcpy(buf + o, piece, plen);
        else
            buf[o] = *s;
        o += plen;
    }
    if (o + 2 > n)
        return false;
    buf[o++] = '\'';
    buf[o] = '\0';
    *len = o;
    return true;
}

void target_init(struct target *t, const struct fetch_conf *c)
{
    memset(t, 0, sizeof *t);
    t->conf = c;
    t->spec = &c->target;
    switch (c->target.kind) {
    case TARGET_SMTP:
    case TARGET_LMTP:
        t->ops = &target_smtp_ops;
        break;
    case TARGET_MDA:
        t->ops = &target_mda_ops;
        break;
    case TARGET_MAILDIR:
        t->ops = &target_maildir_ops;
        break;
    }
}
