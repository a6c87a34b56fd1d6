/* milter.c - the milter wire format (milter.h): packets, OPTNEG and the
 * replies a milter sends, every length checked before it is used. */
#include "milter.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
           (uint32_t)p[3];
}

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

void milter_packet_head(uint8_t head[5], char cmd, size_t len)
{
    put32(head, (uint32_t)(len + 1));
    head[4] = (uint8_t)cmd;
}

int milter_frame(const uint8_t *buf, size_t avail, size_t *total, char *err,
                 size_t n)
{
    if (avail < 4)
        return 0;
    uint32_t len = get32(buf);
    if (len == 0 || len > MILTER_PACKET_MAX) {
        snprintf(err, n, "packet length %lu out of range (1..%u)",
                 (unsigned long)len, MILTER_PACKET_MAX);
        return -1;
    }
    if (avail - 4 < len)
        return 0;
    *total = 4 + (size_t)len;
    return 1;
}

void milter_optneg_request(uint8_t out[12], uint32_t version, uint32_t actions,
                           uint32_t steps)
{
    put32(out, version);
    put32(out + 4, actions);
    put32(out + 8, steps);
}

/* After the three words a version 6 milter may list the macros it wants
 * per stage (u32 stage, names NUL-terminated); odmrd sends its fixed set
 * anyway, but the list must be well formed. */
static bool symlists_ok(const uint8_t *p, size_t len)
{
    while (len) {
        if (len < 5 || get32(p) > 6)
            return false;
        const uint8_t *nul = memchr(p + 4, '\0', len - 4);
        if (!nul)
            return false;
        len -= (size_t)(nul + 1 - p);
        p = nul + 1;
    }
    return true;
}

bool milter_parse_optneg(const uint8_t *data, size_t len, uint32_t version,
                         struct milter_neg *neg, bool *masked, char *err,
                         size_t n)
{
    if (len < 12) {
        snprintf(err, n, "OPTNEG reply of %zu bytes (12 needed)", len);
        return false;
    }
    neg->version = get32(data);
    neg->actions = get32(data + 4);
    neg->steps = get32(data + 8);
    if (neg->version < MILTER_VERSION_MIN || neg->version > version) {
        snprintf(err, n, "milter speaks protocol version %lu (odmrd: %d..%lu)",
                 (unsigned long)neg->version, MILTER_VERSION_MIN,
                 (unsigned long)version);
        return false;
    }
    if (!symlists_ok(data + 12, len - 12)) {
        snprintf(err, n, "malformed macro list in OPTNEG reply");
        return false;
    }
    *masked = (neg->actions & ~MILTER_ACTIONS_OFFERED) ||
              (neg->steps & ~MILTER_STEPS_OFFERED);
    neg->actions &= MILTER_ACTIONS_OFFERED;
    neg->steps &= MILTER_STEPS_OFFERED;
    return true;
}

bool milter_reply_final(char cmd)
{
    return strchr("acdrtsy", cmd) != NULL && cmd != '\0';
}

/* The n-th NUL-terminated string of data (len bytes) starting at *off;
 * NULL when there is no NUL before the end. */
static const char *take_str(const uint8_t *data, size_t len, size_t *off)
{
    if (*off >= len)
        return NULL;
    const uint8_t *nul = memchr(data + *off, '\0', len - *off);
    if (!nul)
        return NULL;
    const char *s = (const char *)data + *off;
    *off = (size_t)(nul - data) + 1;
    return s;
}

/* name NUL value NUL, after an optional 4-byte index. */
static bool parse_header_op(const uint8_t *d, size_t len, bool indexed,
                            struct milter_reply *r, char *err, size_t n)
{
    size_t off = 0;
    if (indexed) {
        if (len < 4) {
            snprintf(err, n, "header change without an index");
            return false;
        }
        r->index = get32(d);
        off = 4;
    }
    r->name = take_str(d, len, &off);
    r->value = r->name ? take_str(d, len, &off) : NULL;
    if (!r->value || off != len) {
        snprintf(err, n, "malformed header modification");
        return false;
    }
    if (!milter_header_name_ok(r->name) || !milter_header_value_ok(r->name, r->value)) {
        snprintf(err, n, "invalid header \"%.60s\" in modification", r->name);
        return false;
    }
    return true;
}

/* One NUL-terminated string filling the data (optionally a second one). */
static bool parse_text(const uint8_t *d, size_t len, bool second_ok,
                       struct milter_reply *r, char *err, size_t n)
{
    size_t off = 0;
    r->text = take_str(d, len, &off);
    if (r->text && second_ok && off < len)
        r->value = take_str(d, len, &off);
    if (!r->text || off != len) {
        snprintf(err, n, "malformed '%c' reply", r->cmd);
        return false;
    }
    return true;
}

static bool parse_replycode(const uint8_t *d, size_t len,
                            struct milter_reply *r, char *err, size_t n)
{
    if (!parse_text(d, len, false, r, err, n))
        return false;
    if (strlen(r->text) >= MILTER_REPLY_MAX) {
        snprintf(err, n, "reply text longer than %d bytes", MILTER_REPLY_MAX - 1);
        return false;
    }
    return milter_check_replycode(r->text, err, n) != 0;
}

bool milter_parse_reply(const uint8_t *pkt, size_t len, struct milter_reply *r,
                        char *err, size_t n)
{
    memset(r, 0, sizeof *r);
    if (len < 1) {
        snprintf(err, n, "empty packet");
        return false;
    }
    r->cmd = (char)pkt[0];
    const uint8_t *d = pkt + 1;
    size_t dlen = len - 1;
    switch (r->cmd) {
    case SMFIR_ACCEPT: case SMFIR_CONTINUE: case SMFIR_DISCARD:
    case SMFIR_REJECT: case SMFIR_TEMPFAIL: case SMFIR_SKIP:
    case SMFIR_PROGRESS:
        if (dlen == 0)
            return true;
        snprintf(err, n, "'%c' reply with %zu data bytes", r->cmd, dlen);
        return false;
    case SMFIR_REPLYCODE:
        return parse_replycode(d, dlen, r, err, n);
    case SMFIR_ADDHEADER:
        return parse_header_op(d, dlen, false, r, err, n);
    case SMFIR_INSHEADER: case SMFIR_CHGHEADER:
        return parse_header_op(d, dlen, true, r, err, n);
    case SMFIR_ADDRCPT: case SMFIR_DELRCPT: case SMFIR_QUARANTINE:
        return parse_text(d, dlen, false, r, err, n);
    case SMFIR_ADDRCPT_PAR: case SMFIR_CHGFROM:
        return parse_text(d, dlen, true, r, err, n);
    case SMFIR_REPLBODY:
        r->data = d;
        r->len = dlen;
        return true;
    default:
        snprintf(err, n, "unknown reply command 0x%02x",
                 (unsigned)(unsigned char)r->cmd);
        return false;
    }
}

/* One line of a reply: "DDD" then ' ', '-' or the end; printable text. */
static int reply_line_code(const char *p, size_t len, bool *more)
{
    if (len < 3 || (p[0] != '4' && p[0] != '5') || p[1] < '0' || p[1] > '9' ||
        p[2] < '0' || p[2] > '9')
        return 0;
    if (len > 3 && p[3] != ' ' && p[3] != '-')
        return 0;
    for (size_t i = 3; i < len; i++)
        if ((unsigned char)p[i] < 32 || (unsigned char)p[i] == 127)
            return 0;
    *more = len > 3 && p[3] == '-';
    return (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
}

int milter_check_replycode(const char *text, char *err, size_t n)
{
    int code = 0;
    bool more = true;
    const char *p = text;
    while (more) {
        const char *eol = strstr(p, "\r\n");
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        int c = reply_line_code(p, len, &more);
        if (!c || (code && c != code) || more != (eol != NULL)) {
            snprintf(err, n, "bad reply code text \"%.80s\"", text);
            return 0;
        }
        code = c;
        p = eol ? eol + 2 : p + len;
    }
    return code;
}

bool milter_put_str(uint8_t *out, size_t cap, size_t *len, const char *s)
{
    size_t sl = strlen(s) + 1;
    if (sl > cap - *len)
        return false;
    memcpy(out + *len, s, sl);
    *len += sl;
    return true;
}

bool milter_header_name_ok(const char *name)
{
    size_t len = strlen(name);
    if (len == 0 || len > 997)
        return false;
    for (const char *p = name; *p; p++)
        if ((unsigned char)*p < 33 || (unsigned char)*p > 126 || *p == ':')
            return false;
    return true;
}

bool milter_header_value_ok(const char *name, const char *value)
{
    size_t col = strlen(name) + 2;   /* "Name: " starts the first line */
    bool blank_line = false;   /* a continuation line of only blanks yet */
    for (const char *p = value; *p; p++) {
        unsigned char ch = (unsigned char)*p;
        if (*p == '\r' && p[1] == '\n')
            continue;
        if (*p == '\n') {
            /* a line of blanks alone reads as the end of the header
             * block to some programs: what follows would be body */
            if (blank_line || (p[1] != ' ' && p[1] != '\t'))
                return false;
            col = 0;
            blank_line = true;
            continue;
        }
        if ((ch < 32 && ch != '\t') || ch == 127)
            return false;
        if (++col > 998)       /* RFC 5322 2.1.1 */
            return false;
        if (ch != ' ' && ch != '\t')
            blank_line = false;
    }
    return !blank_line;
}

/* ------------------------------------------ sender and recipient args */

/* Appends " " word (len bytes) to out (cap bytes, *len used, always
 * NUL-terminated); false when it does not fit (out unchanged). */
static bool append_word(char *out, size_t cap, size_t *len, const char *w,
                        size_t wlen)
{
    if (*len + 1 + wlen + 1 > cap)
        return false;
    out[(*len)++] = ' ';
    memcpy(out + *len, w, wlen);
    *len += wlen;
    out[*len] = '\0';
    return true;
}

/* Is the keyword of word (up to '=' or its end) one of names? */
static bool keyword_in(const char *word, size_t len, const char *const *names)
{
    const char *eq = memchr(word, '=', len);
    size_t klen = eq ? (size_t)(eq - word) : len;
    for (size_t i = 0; names[i]; i++)
        if (strlen(names[i]) == klen && !strncasecmp(word, names[i], klen))
            return true;
    return false;
}

/* "<addr>" for addr with or without its angle brackets. */
static bool bracketed(const char *addr, char *out, size_t cap, size_t *len)
{
    int w = snprintf(out, cap, addr[0] == '<' ? "%s" : "<%s>", addr);
    if (w < 0 || (size_t)w >= cap)
        return false;
    *len = (size_t)w;
    return true;
}

/* The next space-separated word of *p (NULL at the end); *len its length. */
static const char *next_word(const char **p, size_t *len)
{
    while (**p == ' ' || **p == '\t')
        (*p)++;
    if (!**p)
        return NULL;
    const char *w = *p;
    *len = strcspn(w, " \t");
    *p = w + *len;
    return w;
}

bool milter_parse_chgfrom(const char *addr, const char *args, bool utf8_ok,
                          struct mail_args *out, char *ignored, size_t in,
                          char *err, size_t n)
{
    static const char *const kept[] = {"BODY", "SMTPUTF8", "RET", "ENVID", NULL};
    static const char *const dropped[] = {"SIZE", NULL};
    static const char *const utf8[] = {"SMTPUTF8", NULL};
    char line[SMTP_MAILRCPT_LINE_MAX];
    size_t len, ilen = 0, wlen;
    bool given_utf8 = false;
    ignored[0] = '\0';
    if (!addr[0] || !bracketed(addr, line, sizeof line, &len)) {
        snprintf(err, n, "bad sender address \"%.80s\"", addr);
        return false;
    }
    for (const char *p = args ? args : "", *w; (w = next_word(&p, &wlen));) {
        if (keyword_in(w, wlen, kept)) {
            given_utf8 |= keyword_in(w, wlen, utf8);
            if (!append_word(line, sizeof line, &len, w, wlen)) {
                snprintf(err, n, "sender arguments too long");
                return false;
            }
        } else if (!keyword_in(w, wlen, dropped)) {
            append_word(ignored, in, &ilen, w, wlen);
        }
    }
    /* an SMTPUTF8 transaction may get a UTF-8 sender without the arg */
    if (utf8_ok && !given_utf8 &&
        !append_word(line, sizeof line, &len, "SMTPUTF8", 8)) {
        snprintf(err, n, "sender arguments too long");
        return false;
    }
    struct smtp_err e;
    if (!smtp_parse_mail(line, out, true, &e)) {
        snprintf(err, n, "bad sender \"%.80s\": %s", line, e.reply);
        return false;
    }
    return true;
}

/* Would RCPT TO take these args?  (The address is checked by the caller;
 * a fixed one stands in for it here.) */
static bool rcpt_args_ok(const char *args)
{
    char line[SMTP_MAILRCPT_LINE_MAX];
    struct rcpt_args ra;
    struct smtp_err e;
    int w = snprintf(line, sizeof line, "<x@example.invalid>%s", args);
    return w >= 0 && (size_t)w < sizeof line &&
           smtp_parse_rcpt(line, &ra, false, &e);
}

bool milter_rcpt_with_args(const char *addr, const char *args, char *out,
                           size_t on, char *ignored, size_t in)
{
    static const char *const kept[] = {"NOTIFY", "ORCPT", NULL};
    char taken[SMTP_MAILRCPT_LINE_MAX] = "";
    size_t tlen = 0, ilen = 0, wlen, len;
    ignored[0] = '\0';
    if (!bracketed(addr, out, on, &len))
        return false;
    for (const char *p = args ? args : "", *w; (w = next_word(&p, &wlen));) {
        size_t before = tlen;
        bool ok = keyword_in(w, wlen, kept) &&
                  append_word(taken, sizeof taken, &tlen, w, wlen);
        if (ok && !rcpt_args_ok(taken)) {   /* a bad value, or a repeat */
            tlen = before;
            taken[tlen] = '\0';
            ok = false;
        }
        if (!ok)
            append_word(ignored, in, &ilen, w, wlen);
    }
    if (len + tlen + 1 > on)
        return false;
    memcpy(out + len, taken, tlen + 1);
    return true;
}
