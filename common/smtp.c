/* smtp.c - SMTP command and reply parsing shared by server and client.
 *
 * Everything here is a pure function over a NUL-terminated line that the
 * I/O layer has already bounded (SMTP_LINE_MAX / SMTP_MAILRCPT_LINE_MAX).
 * Parsers never write through the input; results are copied into the
 * fixed-size fields of the caller's structures with explicit bounds.
 */
#include "smtp.h"

#include <stdio.h>
#include <string.h>

/* A reply with more lines than this is abuse, not a capability list: the
 * caller reading line by line needs a bound on its loop. */
#define REPLY_MAX_LINES 200
/* How much of an offending parameter keyword is echoed back. */
#define KEYWORD_ECHO_MAX 40
/* RFC 1870: size-value = 1*20DIGIT. */
#define SIZE_DIGITS_MAX 20

static bool is_alpha(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static bool is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

static bool is_alnum(unsigned char c)
{
    return is_alpha(c) || is_digit(c);
}

static unsigned char to_upper(unsigned char c)
{
    return (c >= 'a' && c <= 'z') ? (unsigned char)(c - 'a' + 'A') : c;
}

/* Case-insensitive comparison of a counted span with a NUL-terminated
 * word, which must match in full. */
static bool span_eq(const char *s, size_t n, const char *word)
{
    size_t i;

    for (i = 0; i < n; i++)
        if (word[i] == '\0' || to_upper((unsigned char)s[i]) !=
                                   to_upper((unsigned char)word[i]))
            return false;
    return word[n] == '\0';
}

/* ---- commands ---- */

static const char *const verb_names[] = {
    [SMTP_UNKNOWN] = "UNKNOWN", [SMTP_HELO] = "HELO",
    [SMTP_EHLO] = "EHLO",       [SMTP_LHLO] = "LHLO",
    [SMTP_MAIL] = "MAIL",       [SMTP_RCPT] = "RCPT",
    [SMTP_DATA] = "DATA",       [SMTP_BDAT] = "BDAT",
    [SMTP_RSET] = "RSET",       [SMTP_NOOP] = "NOOP",
    [SMTP_QUIT] = "QUIT",       [SMTP_HELP] = "HELP",
    [SMTP_VRFY] = "VRFY",       [SMTP_EXPN] = "EXPN",
    [SMTP_STARTTLS] = "STARTTLS", [SMTP_AUTH] = "AUTH",
    [SMTP_ATRN] = "ATRN",       [SMTP_ETRN] = "ETRN",
    [SMTP_TURN] = "TURN",
};

#define NVERBS (sizeof verb_names / sizeof verb_names[0])

const char *smtp_verb_name(enum smtp_verb v)
{
    if ((size_t)v >= NVERBS || verb_names[v] == NULL)
        return verb_names[SMTP_UNKNOWN];
    return verb_names[v];
}

static const char *skip_spaces(const char *p)
{
    while (*p == ' ')
        p++;
    return p;
}

/* "MAIL FROM:" / "RCPT TO:": p is just past the verb.  One or more spaces
 * before the keyword are tolerated; the colon must follow it directly. */
static const char *path_arg(const char *p, const char *keyword)
{
    size_t n = strlen(keyword);

    if (*p != ' ')
        return NULL;
    p = skip_spaces(p);
    if (strnlen(p, n) < n || !span_eq(p, n, keyword))
        return NULL;
    return skip_spaces(p + n);
}

void smtp_cmd_parse(const char *line, struct smtp_cmd *cmd)
{
    size_t n = 0, v;

    cmd->verb = SMTP_UNKNOWN;
    cmd->arg = "";
    if (line == NULL)
        return;
    while (is_alpha((unsigned char)line[n]) && n < 16)
        n++;
    /* the verb must be a whole word: "QUITX" and "MAIL:" are unknown */
    if (line[n] != '\0' && line[n] != ' ')
        return;
    for (v = SMTP_UNKNOWN + 1; v < NVERBS; v++)
        if (verb_names[v] != NULL && span_eq(line, n, verb_names[v]))
            break;
    if (v == NVERBS)
        return;
    cmd->verb = (enum smtp_verb)v;
    if (cmd->verb == SMTP_MAIL)
        cmd->arg = path_arg(line + n, "FROM:");
    else if (cmd->verb == SMTP_RCPT)
        cmd->arg = path_arg(line + n, "TO:");
    else
        cmd->arg = skip_spaces(line + n);
}

/* ---- error replies ---- */

static bool fail(struct smtp_err *err, int code, const char *reply)
{
    if (err != NULL) {
        err->code = code;
        snprintf(err->reply, sizeof err->reply, "%s", reply);
    }
    return false;
}

/* "501 5.5.4 Invalid parameter: KEYWORD": the keyword comes from the
 * client, so only printable ASCII is echoed and its length is capped. */
static bool fail_param(struct smtp_err *err, int code, const char *prefix,
                       const char *kw, size_t kwlen)
{
    char clean[KEYWORD_ECHO_MAX + 1];
    size_t i;

    if (kwlen > KEYWORD_ECHO_MAX)
        kwlen = KEYWORD_ECHO_MAX;
    for (i = 0; i < kwlen; i++) {
        unsigned char c = (unsigned char)kw[i];
        clean[i] = (c >= 33 && c <= 126) ? (char)c : '?';
    }
    clean[kwlen] = '\0';
    if (err != NULL) {
        err->code = code;
        snprintf(err->reply, sizeof err->reply, "%d 5.5.4 %s: %s", code,
                 prefix, clean);
    }
    return false;
}

static bool ok(struct smtp_err *err)
{
    if (err != NULL) {
        err->code = 0;
        err->reply[0] = '\0';
    }
    return true;
}

/* ---- xtext (RFC 3461 section 4) ---- */

/* xchar: any printable ASCII except "+" and "=", which must be encoded. */
static bool is_xchar(unsigned char c)
{
    return c >= 33 && c <= 126 && c != '+' && c != '=';
}

static int hex_value(unsigned char c, bool lower_ok)
{
    if (is_digit(c))
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (lower_ok && c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* The RFC's hexchar is "+" followed by two upper-case hex digits. */
static bool xtext_valid_n(const char *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c == '+') {
            if (n - i < 3 || hex_value((unsigned char)s[i + 1], false) < 0 ||
                hex_value((unsigned char)s[i + 2], false) < 0)
                return false;
            i += 3;
        } else if (is_xchar(c)) {
            i++;
        } else {
            return false;
        }
    }
    return true;
}

bool xtext_valid(const char *s)
{
    return s != NULL && xtext_valid_n(s, strlen(s));
}

/* Decoding accepts lower-case hex as well (be liberal in what we read back
 * from our own spool or from peers), but never "+00": the output is a C
 * string and an embedded NUL would silently shorten it. */
bool xtext_decode(const char *s, char *out, size_t n)
{
    size_t o = 0;

    if (out == NULL || n == 0)
        return false;
    out[0] = '\0';
    if (s == NULL)
        return false;
    while (*s != '\0') {
        int c = (unsigned char)*s, step = 1;
        if (c == '+') {
            int hi = hex_value((unsigned char)s[1], true);
            int lo = hi < 0 ? -1 : hex_value((unsigned char)s[2], true);
            c = hi * 16 + lo;
            if (lo < 0 || c == 0)
                break;
            step = 3;
        } else if (!is_xchar((unsigned char)c)) {
            break;
        }
        if (o + 1 >= n)
            break;
        out[o++] = (char)c;
        s += step;
    }
    out[*s == '\0' ? o : 0] = '\0';
    return *s == '\0';
}

bool xtext_encode(const char *s, char *out, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;

    if (out == NULL || n == 0)
        return false;
    out[0] = '\0';
    if (s == NULL)
        return false;
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        size_t need = is_xchar(c) ? 1 : 3;
        if (o + need >= n)
            break;
        if (need == 1) {
            out[o++] = (char)c;
        } else {
            out[o++] = '+';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        }
    }
    out[*s == '\0' ? o : 0] = '\0';
    return *s == '\0';
}

/* ---- ESMTP parameters (RFC 5321 4.1.2) ---- */

struct param {
    const char *kw;
    size_t kwlen;
    const char *val; /* NULL when there is no "=" */
    size_t vallen;
};

/* esmtp-param = esmtp-keyword ["=" esmtp-value]
 * esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
 * esmtp-value = 1*(%d33-60 / %d62-126)
 * Fills pa even on failure so the keyword can be reported. */
static bool split_param(const char *tok, size_t len, struct param *pa)
{
    const char *eq = memchr(tok, '=', len);
    size_t i;

    pa->kw = tok;
    pa->kwlen = eq != NULL ? (size_t)(eq - tok) : len;
    pa->val = eq != NULL ? eq + 1 : NULL;
    pa->vallen = eq != NULL ? len - pa->kwlen - 1 : 0;
    if (pa->kwlen == 0) {
        pa->kwlen = len; /* "=x": echo the whole token */
        return false;
    }
    for (i = 0; i < pa->kwlen; i++) {
        unsigned char c = (unsigned char)tok[i];
        if (!is_alnum(c) && (i == 0 || c != '-'))
            return false;
    }
    if (pa->val == NULL)
        return true;
    if (pa->vallen == 0)
        return false;
    for (i = 0; i < pa->vallen; i++) {
        unsigned char c = (unsigned char)pa->val[i];
        if (c < 33 || c > 126 || c == '=')
            return false;
    }
    return true;
}

/* Next space-separated token; tolerant of repeated and trailing spaces. */
static const char *next_token(const char *p, const char **tok, size_t *len)
{
    p = skip_spaces(p);
    *tok = p;
    while (*p != '\0' && *p != ' ')
        p++;
    *len = (size_t)(p - *tok);
    return p;
}

/* Copies a validated parameter value into a field of size cap + 1. */
static void copy_value(char *dst, size_t cap, const struct param *pa)
{
    size_t n = pa->vallen < cap ? pa->vallen : cap;

    memcpy(dst, pa->val, n);
    dst[n] = '\0';
}

static bool digits_to_u64(const char *s, size_t n, uint64_t *out)
{
    uint64_t v = 0;
    size_t i;

    if (n == 0 || n > SIZE_DIGITS_MAX)
        return false;
    for (i = 0; i < n; i++) {
        unsigned d;
        if (!is_digit((unsigned char)s[i]))
            return false;
        d = (unsigned)(s[i] - '0');
        /* RFC 1870 allows 20 digits: a value past 64 bits is valid syntax
         * for "too big", so it saturates instead of failing. */
        v = (v > (UINT64_MAX - d) / 10) ? UINT64_MAX : v * 10 + d;
    }
    *out = v;
    return true;
}

/* A handler validates the value and stores it; false means malformed. */
typedef bool (*mail_handler)(const struct param *pa, struct mail_args *m);
typedef bool (*rcpt_handler)(const struct param *pa, struct rcpt_args *r);

static bool mail_size(const struct param *pa, struct mail_args *m)
{
    return pa->val != NULL && digits_to_u64(pa->val, pa->vallen, &m->size);
}

static bool mail_body(const struct param *pa, struct mail_args *m)
{
    if (pa->val == NULL)
        return false;
    if (span_eq(pa->val, pa->vallen, "7BIT"))
        m->body = BODY_7BIT;
    else if (span_eq(pa->val, pa->vallen, "8BITMIME"))
        m->body = BODY_8BITMIME;
    else
        return false;
    return true;
}

static bool mail_ret(const struct param *pa, struct mail_args *m)
{
    if (pa->val == NULL)
        return false;
    if (span_eq(pa->val, pa->vallen, "FULL"))
        m->ret = RET_FULL;
    else if (span_eq(pa->val, pa->vallen, "HDRS"))
        m->ret = RET_HDRS;
    else
        return false;
    return true;
}

static bool mail_envid(const struct param *pa, struct mail_args *m)
{
    if (pa->val == NULL || pa->vallen > SMTP_ENVID_MAX ||
        !xtext_valid_n(pa->val, pa->vallen))
        return false;
    copy_value(m->envid, SMTP_ENVID_MAX, pa);
    return true;
}

static bool mail_smtputf8(const struct param *pa, struct mail_args *m)
{
    if (pa->val != NULL)
        return false;
    m->smtputf8 = true;
    return true;
}

/* RFC 4954 5: AUTH=<mailbox as xtext> or "<>".  We do not relay on behalf
 * of authenticated submitters, so it is checked for syntax and dropped. */
static bool mail_auth(const struct param *pa, struct mail_args *m)
{
    (void)m;
    return pa->val != NULL && xtext_valid_n(pa->val, pa->vallen);
}

/* notify-list-element = "SUCCESS" / "FAILURE" / "DELAY", comma separated;
 * "NEVER" stands alone (RFC 3461 4.1). */
static bool rcpt_notify(const struct param *pa, struct rcpt_args *r)
{
    static const struct { const char *name; unsigned bit; } items[] = {
        {"NEVER", DSN_NOTIFY_NEVER},
        {"SUCCESS", DSN_NOTIFY_SUCCESS},
        {"FAILURE", DSN_NOTIFY_FAILURE},
        {"DELAY", DSN_NOTIFY_DELAY},
    };
    const char *p, *end;
    unsigned bits = 0;

    if (pa->val == NULL)
        return false;
    p = pa->val;
    end = pa->val + pa->vallen;
    for (;;) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *stop = comma != NULL ? comma : end;
        size_t i, n = (size_t)(stop - p);
        for (i = 0; i < sizeof items / sizeof items[0]; i++)
            if (span_eq(p, n, items[i].name))
                break;
        if (i == sizeof items / sizeof items[0] || (bits & items[i].bit))
            return false; /* unknown, empty or repeated element */
        bits |= items[i].bit;
        if (comma == NULL)
            break;
        p = comma + 1;
    }
    if ((bits & DSN_NOTIFY_NEVER) && bits != DSN_NOTIFY_NEVER)
        return false;
    r->notify = bits;
    return true;
}

/* RFC 5322 atext, for the addr-type atom ("rfc822", "utf-8", ...). */
static bool is_atext(unsigned char c)
{
    return is_alnum(c) || (c != '\0' && strchr("!#$%&'*+-/=?^_`{|}~", c));
}

/* original-recipient-address = addr-type ";" xtext (RFC 3461 4.2); the
 * whole value may be up to 500 characters.  The address itself is not
 * checked against addr-type's syntax (the RFC says it need not conform),
 * but an empty one carries no information and is refused. */
static bool rcpt_orcpt(const struct param *pa, struct rcpt_args *r)
{
    const char *semi;
    size_t i, typelen;

    if (pa->val == NULL || pa->vallen > SMTP_ORCPT_MAX)
        return false;
    semi = memchr(pa->val, ';', pa->vallen);
    if (semi == NULL)
        return false;
    typelen = (size_t)(semi - pa->val);
    if (typelen == 0 || typelen + 1 == pa->vallen)
        return false;
    for (i = 0; i < typelen; i++)
        if (!is_atext((unsigned char)pa->val[i]))
            return false;
    if (!xtext_valid_n(semi + 1, pa->vallen - typelen - 1))
        return false;
    copy_value(r->orcpt, SMTP_ORCPT_MAX, pa);
    return true;
}

static const struct mail_param_def {
    const char *name;
    mail_handler fn;
} mail_params[] = {
    {"SIZE", mail_size},   {"BODY", mail_body},         {"RET", mail_ret},
    {"ENVID", mail_envid}, {"SMTPUTF8", mail_smtputf8}, {"AUTH", mail_auth},
};

static const struct rcpt_param_def {
    const char *name;
    rcpt_handler fn;
} rcpt_params[] = {
    {"NOTIFY", rcpt_notify},
    {"ORCPT", rcpt_orcpt},
};

#define NMAIL_PARAMS (sizeof mail_params / sizeof mail_params[0])
#define NRCPT_PARAMS (sizeof rcpt_params / sizeof rcpt_params[0])

/* Splits the parameter string into at most SMTP_MAX_PARAMS well-formed
 * params.  Returns the number found, or -1 with err filled in. */
static int split_params(const char *p, struct param *pa,
                        struct smtp_err *err)
{
    int n = 0;

    for (;;) {
        const char *tok;
        size_t len;
        p = next_token(p, &tok, &len);
        if (len == 0)
            return n;
        if (n == SMTP_MAX_PARAMS) {
            fail(err, 501, "501 5.5.4 Too many parameters");
            return -1;
        }
        if (!split_param(tok, len, &pa[n])) {
            fail_param(err, 501, "Invalid parameter", pa[n].kw, pa[n].kwlen);
            return -1;
        }
        n++;
    }
}

/* Index of the parameter name in a table, or -1.  The tables are small. */
static int find_mail_param(const struct param *pa)
{
    size_t i;

    for (i = 0; i < NMAIL_PARAMS; i++)
        if (span_eq(pa->kw, pa->kwlen, mail_params[i].name))
            return (int)i;
    return -1;
}

static int find_rcpt_param(const struct param *pa)
{
    size_t i;

    for (i = 0; i < NRCPT_PARAMS; i++)
        if (span_eq(pa->kw, pa->kwlen, rcpt_params[i].name))
            return (int)i;
    return -1;
}

static bool mail_params_apply(const char *p, struct mail_args *out,
                              bool utf8_ok, struct smtp_err *err)
{
    struct param pa[SMTP_MAX_PARAMS];
    unsigned seen = 0;
    int n = split_params(p, pa, err), i;

    if (n < 0)
        return false;
    for (i = 0; i < n; i++) {
        int k = find_mail_param(&pa[i]);
        if (k < 0 || (!utf8_ok && mail_params[k].fn == mail_smtputf8))
            return fail_param(err, 555, "Unsupported parameter", pa[i].kw,
                              pa[i].kwlen);
        if ((seen & (1u << k)) || !mail_params[k].fn(&pa[i], out))
            return fail_param(err, 501, "Invalid parameter", pa[i].kw,
                              pa[i].kwlen);
        seen |= 1u << k;
    }
    return true;
}

static bool rcpt_params_apply(const char *p, struct rcpt_args *out,
                              struct smtp_err *err)
{
    struct param pa[SMTP_MAX_PARAMS];
    unsigned seen = 0;
    int n = split_params(p, pa, err), i;

    if (n < 0)
        return false;
    for (i = 0; i < n; i++) {
        int k = find_rcpt_param(&pa[i]);
        if (k < 0)
            return fail_param(err, 555, "Unsupported parameter", pa[i].kw,
                              pa[i].kwlen);
        if ((seen & (1u << k)) || !rcpt_params[k].fn(&pa[i], out))
            return fail_param(err, 501, "Invalid parameter", pa[i].kw,
                              pa[i].kwlen);
        seen |= 1u << k;
    }
    return true;
}

/* ---- MAIL and RCPT ---- */

bool smtp_parse_mail(const char *arg, struct mail_args *out, bool utf8_ok,
                     struct smtp_err *err)
{
    const char *end;
    enum addr_result r;
    bool need_utf8 = false;

    memset(out, 0, sizeof *out);
    if (arg == NULL || arg[0] != '<')
        return fail(err, 501, "501 5.5.4 Syntax: MAIL FROM:<address>");
    /* Whether UTF-8 is allowed depends on a parameter that follows the
     * address, so parse strictly first and remember if UTF-8 was needed. */
    r = addr_parse_path(arg, &end, &out->from, ADDR_ALLOW_NULL);
    if (r == ADDR_NEEDUTF8) {
        need_utf8 = true;
        r = addr_parse_path(arg, &end, &out->from,
                            ADDR_ALLOW_NULL | ADDR_ALLOW_UTF8);
    }
    if (r == ADDR_TOOLONG)
        return fail(err, 501, "501 5.1.7 Address too long");
    if (r != ADDR_OK || (*end != '\0' && *end != ' '))
        return fail(err, 501, "501 5.1.7 Bad sender address syntax");
    if (!mail_params_apply(end, out, utf8_ok, err))
        return false;
    if (need_utf8 && !out->smtputf8)
        return fail(err, 553, "553 5.6.7 Address requires SMTPUTF8");
    return ok(err);
}

bool smtp_parse_rcpt(const char *arg, struct rcpt_args *out, bool utf8_ok,
                     struct smtp_err *err)
{
    const char *end;
    enum addr_result r;

    memset(out, 0, sizeof *out);
    if (arg == NULL || arg[0] != '<')
        return fail(err, 501, "501 5.5.4 Syntax: RCPT TO:<address>");
    r = addr_parse_path(arg, &end, &out->to, utf8_ok ? ADDR_ALLOW_UTF8 : 0);
    if (r == ADDR_TOOLONG)
        return fail(err, 501, "501 5.1.3 Address too long");
    if (r == ADDR_NEEDUTF8)
        return fail(err, 553, "553 5.6.7 Address requires SMTPUTF8");
    if (r != ADDR_OK || (*end != '\0' && *end != ' '))
        return fail(err, 501, "501 5.1.3 Bad recipient address syntax");
    if (!rcpt_params_apply(end, out, err))
        return false;
    return ok(err);
}

/* ---- replies ---- */

void smtp_reply_init(struct smtp_reply *r)
{
    memset(r, 0, sizeof *r);
}

/* Enhanced status code (RFC 3463): class "." subject "." detail, with
 * class 2, 4 or 5 equal to the reply's first digit and 1..3 digits each. */
static void parse_enhanced(struct smtp_reply *r, const char *t)
{
    const char *p = t + 1;
    int part;

    if (t[0] != (char)('0' + r->code / 100) || r->code / 100 == 3)
        return;
    for (part = 0; part < 2; part++) {
        size_t n = 0;
        if (*p++ != '.')
            return;
        while (is_digit((unsigned char)p[n]) && n < 4)
            n++;
        if (n == 0 || n > 3)
            return;
        p += n;
    }
    if (*p != '\0' && *p != ' ')
        return;
    memcpy(r->enhanced, t, (size_t)(p - t)); /* at most 9 octets */
    r->enhanced[p - t] = '\0';
}

/* Appends one line's text, '\n'-separated.  Control characters become '?'
 * so that '\n' stays an unambiguous separator and a hostile peer cannot
 * smuggle terminal escapes into logs; truncation never splits a UTF-8
 * sequence. */
static void append_text(struct smtp_reply *r, const char *t)
{
    size_t used = strnlen(r->text, sizeof r->text - 1);
    size_t room = sizeof r->text - 1 - used, n = strlen(t), i;
    char *dst = r->text + used;

    if (r->nlines > 0) {
        if (room == 0)
            return;
        *dst++ = '\n';
        room--;
    }
    if (n > room) {
        n = room;
        while (n > 0 && ((unsigned char)t[n] & 0xC0) == 0x80)
            n--;
    }
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)t[i];
        dst[i] = (c < 32 || c == 127) ? '?' : (char)c;
    }
    dst[n] = '\0';
}

int smtp_reply_feed(struct smtp_reply *r, const char *line)
{
    int code;
    char sep;
    const char *text;

    if (r->done || line == NULL || r->nlines >= REPLY_MAX_LINES)
        return -1;
    if (line[0] < '2' || line[0] > '5' || !is_digit((unsigned char)line[1]) ||
        !is_digit((unsigned char)line[2]))
        return -1;
    code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
    sep = line[3];
    if (sep != '-' && sep != ' ' && sep != '\0')
        return -1;
    if (r->code != 0 && code != r->code)
        return -1;
    text = sep == '\0' ? "" : line + 4;
    if (r->code == 0) {
        r->code = code;
        parse_enhanced(r, text);
    }
    append_text(r, text);
    r->nlines++;
    r->done = sep != '-';
    return r->done ? 1 : 0;
}

bool smtp_ehlo_has(const struct smtp_reply *r, const char *keyword,
                   char *params, size_t n)
{
    size_t kwlen = keyword != NULL ? strlen(keyword) : 0;
    const char *p;

    if (params != NULL && n > 0)
        params[0] = '\0';
    if (r == NULL || !r->done || kwlen == 0)
        return false;
    /* the first line is the server's greeting/name, not a keyword */
    for (p = strchr(r->text, '\n'); p != NULL; p = strchr(p, '\n')) {
        const char *line = p + 1, *eol = strchr(line, '\n'), *q = line;
        if (eol == NULL)
            eol = line + strlen(line);
        while (q < eol && *q != ' ')
            q++;
        if ((size_t)(q - line) == kwlen && span_eq(line, kwlen, keyword)) {
            if (params != NULL && n > 0) {
                size_t len;
                while (q < eol && *q == ' ')
                    q++;
                len = (size_t)(eol - q) < n - 1 ? (size_t)(eol - q) : n - 1;
                memcpy(params, q, len);
                params[len] = '\0';
            }
            return true;
        }
        p = line;
    }
    return false;
}
