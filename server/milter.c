/* milter.c - the milter wire format (milter.h): packets, OPTNEG and the
 * replies a milter sends, every length checked before it is used. */
#include "milter.h"

#include <stdio.h>
#include <string.h>

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
    if (!milter_header_name_ok(r->name) || !milter_header_value_ok(r->value)) {
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
    case SMFIR_ADDRCPT_PAR:
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

bool milter_header_value_ok(const char *value)
{
    for (const char *p = value; *p; p++) {
        if (*p == '\r' && p[1] != '\n')
            return false;
        if (*p == '\n' && p[1] != ' ' && p[1] != '\t')
            return false;
    }
    return true;
}
