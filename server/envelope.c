/* envelope.c - envelope records and their text serialisation. */
#include "envelope.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "../common/util.h"

#define ENV_LINE_MAX (ADDR_MAX + SMTP_ORCPT_MAX + LAST_REPLY_MAX + 64)

void envelope_init(struct envelope *e)
{
    memset(e, 0, sizeof *e);
}

void envelope_free(struct envelope *e)
{
    free(e->rcpt);
    e->rcpt = NULL;
    e->nrcpt = e->cap = 0;
}

bool envelope_add_rcpt(struct envelope *e, const char *addr, unsigned notify,
                       const char *orcpt, size_t max)
{
    if (e->nrcpt >= max)
        return false;
    if (e->nrcpt == e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 8;
        struct env_rcpt *r = realloc(e->rcpt, cap * sizeof *r);
        if (!r)
            return false;
        e->rcpt = r;
        e->cap = cap;
    }
    struct env_rcpt *r = &e->rcpt[e->nrcpt];
    memset(r, 0, sizeof *r);
    if (!str_copy(r->addr, addr, sizeof r->addr) ||
        !str_copy(r->orcpt, orcpt ? orcpt : "", sizeof r->orcpt))
        return false;
    r->notify = notify;
    e->nrcpt++;
    return true;
}

void envelope_del_rcpt(struct envelope *e, size_t i)
{
    if (i >= e->nrcpt)
        return;
    memmove(&e->rcpt[i], &e->rcpt[i + 1], (e->nrcpt - i - 1) * sizeof *e->rcpt);
    e->nrcpt--;
}

/* Fields must not contain the separators; anything that could is cleaned
 * here so a hostile HELO name or reply text cannot forge a record. */
static void put_field(FILE *f, const char *s)
{
    for (; *s; s++)
        fputc((*s == '\t' || *s == '\n' || *s == '\r') ? ' ' : *s, f);
}

static void put_rec(FILE *f, char letter, const char *value)
{
    fputc(letter, f);
    fputc(' ', f);
    put_field(f, value);
    fputc('\n', f);
}

static const char *ret_name(enum smtp_ret r)
{
    return r == RET_FULL ? "FULL" : r == RET_HDRS ? "HDRS" : NULL;
}

static const char *body_name(enum smtp_body b)
{
    return b == BODY_7BIT ? "7BIT" : b == BODY_8BITMIME ? "8BITMIME" : NULL;
}

bool envelope_write(FILE *f, const struct envelope *e)
{
    fprintf(f, "V 1\n");
    put_rec(f, 'I', e->id);
    put_rec(f, 'D', e->domain);
    fprintf(f, "T %lld\n", (long long)e->arrival);
    put_rec(f, 'F', e->sender);
    fprintf(f, "Z %" PRIu64 "\n", e->size);
    if (e->envid[0])
        put_rec(f, 'E', e->envid);
    if (ret_name(e->ret))
        put_rec(f, 'N', ret_name(e->ret));
    if (body_name(e->body))
        put_rec(f, 'B', body_name(e->body));
    if (e->smtputf8)
        fprintf(f, "U\n");
    put_rec(f, 'C', e->client);
    put_rec(f, 'H', e->helo);
    fprintf(f, "A %u %lld\n", e->attempts, (long long)e->last_attempt);
    for (size_t i = 0; i < e->nrcpt; i++) {
        const struct env_rcpt *r = &e->rcpt[i];
        fputs("R ", f);
        put_field(f, r->addr);
        fprintf(f, "\t%u\t", r->notify);
        put_field(f, r->orcpt[0] ? r->orcpt : "-");
        fputc('\t', f);
        put_field(f, r->last_reply[0] ? r->last_reply : "-");
        fputc('\n', f);
    }
    fputs(".\n", f);
    return !ferror(f);
}

static bool parse_ll(const char *s, long long *out)
{
    char *end;
    if (!*s)
        return false;
    *out = strtoll(s, &end, 10);
    return *end == '\0' || *end == ' ';
}

static bool parse_rcpt(struct envelope *e, char *v)
{
    char *fields[4];
    for (int i = 0; i < 4; i++) {
        fields[i] = v;
        char *tab = strchr(v, '\t');
        if (i < 3) {
            if (!tab)
                return false;
            *tab = '\0';
            v = tab + 1;
        }
    }
    unsigned long notify;
    if (!parse_ulong(fields[1], 15, &notify))
        return false;
    const char *orcpt = strcmp(fields[2], "-") ? fields[2] : "";
    if (!envelope_add_rcpt(e, fields[0], (unsigned)notify, orcpt, SIZE_MAX))
        return false;
    if (strcmp(fields[3], "-"))
        str_copy(e->rcpt[e->nrcpt - 1].last_reply, fields[3],
                 sizeof e->rcpt[0].last_reply);
    return true;
}

/* Applies one record; false when it is malformed or unknown. */
static bool parse_rec(struct envelope *e, char letter, char *v)
{
    long long n;
    switch (letter) {
    case 'I': return str_copy(e->id, v, sizeof e->id);
    case 'D': return str_copy(e->domain, v, sizeof e->domain);
    case 'T': if (!parse_ll(v, &n)) return false; e->arrival = (time_t)n; return true;
    case 'F': return str_copy(e->sender, v, sizeof e->sender);
    case 'Z': if (!parse_ll(v, &n) || n < 0) return false; e->size = (uint64_t)n; return true;
    case 'E': return str_copy(e->envid, v, sizeof e->envid);
    case 'N':
        e->ret = !strcmp(v, "FULL") ? RET_FULL : !strcmp(v, "HDRS") ? RET_HDRS : RET_UNSPEC;
        return e->ret != RET_UNSPEC;
    case 'B':
        e->body = !strcmp(v, "7BIT") ? BODY_7BIT : !strcmp(v, "8BITMIME") ? BODY_8BITMIME
                                                                          : BODY_UNSPEC;
        return e->body != BODY_UNSPEC;
    case 'U': e->smtputf8 = true; return true;
    case 'C': return str_copy(e->client, v, sizeof e->client);
    case 'H': return str_copy(e->helo, v, sizeof e->helo);
    case 'A': {
        char *sp = strchr(v, ' ');
        if (!sp || !parse_ll(v, &n) || n < 0)
            return false;
        e->attempts = (unsigned)n;
        if (!parse_ll(sp + 1, &n))
            return false;
        e->last_attempt = (time_t)n;
        return true;
    }
    case 'R': return parse_rcpt(e, v);
    default: return false;
    }
}

bool envelope_read(FILE *f, struct envelope *e, char *err, size_t n)
{
    char line[ENV_LINE_MAX];
    int lineno = 0;
    envelope_init(e);
    while (fgets(line, sizeof line, f)) {
        lineno++;
        size_t len = strlen(line);
        if (len == 0 || line[len - 1] != '\n') {
            snprintf(err, n, "line %d: truncated or too long", lineno);
            goto bad;
        }
        line[--len] = '\0';
        if (lineno == 1) {
            if (strcmp(line, "V 1")) {
                snprintf(err, n, "unknown envelope version");
                goto bad;
            }
            continue;
        }
        if (!strcmp(line, ".")) {
            if (!e->id[0] || !e->domain[0]) {
                snprintf(err, n, "missing id or domain");
                goto bad;
            }
            return true;
        }
        bool bare = (line[1] == '\0');
        if (!(bare || line[1] == ' ') || !parse_rec(e, line[0], bare ? line + 1 : line + 2)) {
            snprintf(err, n, "line %d: bad record", lineno);
            goto bad;
        }
    }
    snprintf(err, n, "incomplete (no end marker)");
bad:
    envelope_free(e);
    return false;
}
