/* fuzz_milter.c - libFuzzer harness for server/milter.c, the milter wire
 * format (make fuzz).  The input is what a milter sends: a stream of
 * packets, the first one taken as the OPTNEG reply.
 *
 * Properties checked on every input: no crash or sanitizer report; every
 * packet milter_frame accepts lies inside the input and within
 * MILTER_PACKET_MAX; every string of a parsed reply ends inside its
 * packet; a parsed reply code is 4xx or 5xx; negotiated actions and steps
 * are within what odmrd offered; the sender and recipient args of
 * SMFIR_CHGFROM / SMFIR_ADDRCPT_PAR parse without overrunning. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* milter.c belongs to odmrd, not to the common sources the fuzz rule
 * links: compiled in here. */
#include "../../server/milter.c"

static void inside(const void *s, const uint8_t *pkt, size_t len)
{
    if (!s)
        return;
    const uint8_t *p = s;
    if (p < pkt || p >= pkt + len || !memchr(p, '\0', (size_t)(pkt + len - p)))
        abort();
}

static void check_reply(const uint8_t *pkt, size_t len)
{
    struct milter_reply r;
    char err[256];
    if (!milter_parse_reply(pkt, len, &r, err, sizeof err))
        return;
    inside(r.name, pkt, len);
    inside(r.value, pkt, len);
    inside(r.text, pkt, len);
    if (r.data && (r.data < pkt || r.data + r.len > pkt + len))
        abort();
    if (r.cmd == SMFIR_CHGFROM) {   /* whatever the sender, no overrun */
        struct mail_args m;
        char ign[64];
        if (milter_parse_chgfrom(r.text, r.value, r.text[0] & 1, &m, ign,
                                 sizeof ign, err, sizeof err) &&
            strlen(ign) >= sizeof ign)
            abort();
    }
    if (r.cmd == SMFIR_ADDRCPT_PAR) {
        char out[SMTP_MAILRCPT_LINE_MAX], ign[64];
        if (milter_rcpt_with_args(r.text, r.value, out, sizeof out, ign,
                                  sizeof ign) && out[0] != '<')
            abort();
    }
    if (r.cmd == SMFIR_REPLYCODE) {
        int code = milter_check_replycode(r.text, err, sizeof err);
        if (code < 400 || code > 599)
            abort();
    }
}

static void check_optneg(const uint8_t *pkt, size_t len)
{
    struct milter_neg neg;
    bool masked;
    char err[256];
    if (len < 1 || !milter_parse_optneg(pkt + 1, len - 1, 6, &neg, &masked, err,
                                        sizeof err))
        return;
    if ((neg.actions & ~MILTER_ACTIONS_OFFERED) ||
        (neg.steps & ~MILTER_STEPS_OFFERED) || neg.version < 2 ||
        neg.version > 6)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256];
    size_t off = 0, total;
    bool first = true;
    while (milter_frame(data + off, size - off, &total, err, sizeof err) == 1) {
        if (total < 5 || total > size - off || total - 4 > MILTER_PACKET_MAX)
            abort();
        /* a copy of exactly the packet, so reading past it is caught */
        uint8_t *pkt = malloc(total - 4);
        if (!pkt)
            return 0;
        memcpy(pkt, data + off + 4, total - 4);
        if (first)
            check_optneg(pkt, total - 4);
        else
            check_reply(pkt, total - 4);
        free(pkt);
        first = false;
        off += total;
    }
    return 0;
}
