/* addr.c - RFC 5321 path parsing with the RFC 6531 (SMTPUTF8) extensions.
 *
 * The parser never copies anything until the whole path has been checked:
 * it works on (pointer, length) spans of the caller's string, so a hostile
 * 2 KB address costs one linear scan and cannot overflow a buffer.  Only
 * after the syntax is known to be good are the lengths compared with the
 * storage limits of struct mailbox (ADDR_TOOLONG) and, last, the presence of
 * non-ASCII octets with the SMTPUTF8 flag (ADDR_NEEDUTF8).
 *
 * Grammar (RFC 5321 4.1.2 and 4.1.3, RFC 6531 3.3):
 *   Path      = "<" [ A-d-l ":" ] Mailbox ">"
 *   A-d-l     = At-domain *( "," At-domain ) ; At-domain = "@" Domain
 *   Mailbox   = Local-part "@" ( Domain / address-literal )
 *   Local-part= Dot-string / Quoted-string
 *   atext, qtextSMTP and sub-domain additionally admit UTF8-non-ascii.
 */
#include "addr.h"

#include <string.h>

#define LABEL_MAX 63 /* RFC 1035 2.3.4 */

/* A Mailbox located inside the input, not yet copied. */
struct span_mailbox {
    const char *local;
    size_t local_len;
    const char *domain;
    size_t domain_len;
    bool literal;
    bool nonascii; /* any UTF-8 seen (including a discarded source route) */
};

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

static bool is_hex(unsigned char c)
{
    return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static unsigned char to_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c - 'A' + 'a') : c;
}

/* RFC 5322 atext (ASCII part). */
static bool is_atext(unsigned char c)
{
    return is_alnum(c) || (c != '\0' && strchr("!#$%&'*+-/=?^_`{|}~", c));
}

void addr_local_unquote(const char **local, size_t *len)
{
    const char *s = *local;
    size_t n = *len;
    if (n < 3 || s[0] != '"' || s[n - 1] != '"' || s[1] == '.' || s[n - 2] == '.')
        return;
    for (size_t i = 1; i + 1 < n; i++) {
        unsigned char c = (unsigned char)s[i];
        /* atext or a single dot; a quoted-pair's '\\' is neither */
        if (c == '.' ? s[i + 1] == '.' : !is_atext(c))
            return;
    }
    *local = s + 1;
    *len = n - 2;
}

bool addr_local_plain(const char *local, char *out, size_t n)
{
    size_t len = strlen(local);
    addr_local_unquote(&local, &len);
    if (len >= n)
        return false;
    memcpy(out, local, len);
    out[len] = '\0';
    return true;
}

/* RFC 5321 qtextSMTP: printable ASCII and space, minus '"' and '\'. */
static bool is_qtext(unsigned char c)
{
    return c >= 32 && c <= 126 && c != '"' && c != '\\';
}

/* Length of the well-formed UTF-8 sequence (RFC 3629 section 4) at s, or 0.
 * The second-byte ranges exclude overlong forms (C0, C1, E0 80..9F,
 * F0 80..8F), UTF-16 surrogates (ED A0..BF) and code points above U+10FFFF
 * (F4 90.., F5..FF).  C1 controls (U+0080..U+009F, C2 80..9F) are rejected
 * too: they are control characters, which have no place in an address. */
static size_t utf8_seq(const unsigned char *s, size_t avail)
{
    unsigned char c = s[0], lo = 0x80, hi = 0xBF;
    size_t len, i;

    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF)
        len = 3;
    else if (c >= 0xF0 && c <= 0xF4)
        len = 4;
    else
        return 0;
    if (c == 0xC2)
        lo = 0xA0;
    else if (c == 0xE0)
        lo = 0xA0;
    else if (c == 0xED)
        hi = 0x9F;
    else if (c == 0xF0)
        lo = 0x90;
    else if (c == 0xF4)
        hi = 0x8F;
    if (len > avail || s[1] < lo || s[1] > hi)
        return 0;
    /* Each byte is checked before the next is read, so a NUL stops us. */
    for (i = 2; i < len; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    return len;
}

/* utf8_seq for a NUL-terminated string: at most 4 octets are ever needed. */
static size_t utf8_seq_str(const char *s)
{
    return utf8_seq((const unsigned char *)s, strnlen(s, 4));
}

/* ---- domains ---- */

/* One label of a domain: LDH (no leading/trailing hyphen) or, with UTF-8,
 * a U-label.  ASCII labels are limited to 63 octets.  A U-label's DNS
 * length is that of its A-label, which cannot be computed without IDNA
 * tables, so U-labels are bounded only by the total domain length. */
static bool label_ok(const char *d, size_t n, bool *nonascii)
{
    size_t i = 0;
    bool utf8 = false;

    if (n == 0 || d[0] == '-' || d[n - 1] == '-')
        return false;
    while (i < n) {
        unsigned char c = (unsigned char)d[i];
        if (c < 0x80) {
            if (!is_alnum(c) && c != '-')
                return false;
            i++;
        } else {
            size_t k = utf8_seq((const unsigned char *)d + i, n - i);
            if (k == 0)
                return false;
            utf8 = true;
            i += k;
        }
    }
    if (utf8)
        *nonascii = true;
    return utf8 || n <= LABEL_MAX;
}

/* Dot-separated labels; no empty label, so no leading, trailing or double
 * dot (a trailing root dot is not part of the SMTP grammar).  The total
 * length is checked by the callers, which differ in how they report it. */
static bool domain_syntax(const char *d, size_t n, bool *nonascii)
{
    size_t start = 0, i;

    for (i = 0; i <= n; i++) {
        if (i == n || d[i] == '.') {
            if (!label_ok(d + start, i - start, nonascii))
                return false;
            start = i + 1;
        }
    }
    return n > 0;
}

bool addr_valid_domain(const char *d, bool utf8)
{
    bool nonascii = false;
    size_t n;

    if (d == NULL)
        return false;
    n = strnlen(d, ADDR_DOMAIN_MAX + 1);
    if (n == 0 || n > ADDR_DOMAIN_MAX)
        return false;
    if (!domain_syntax(d, n, &nonascii))
        return false;
    return utf8 || !nonascii;
}

/* ---- address literals (RFC 5321 4.1.3) ---- */

/* Snum 3("." Snum), Snum = 1*3DIGIT with a value of 0..255. */
static bool ipv4_ok(const char *s, size_t n)
{
    size_t i = 0;
    int part;

    for (part = 0; part < 4; part++) {
        unsigned value = 0;
        size_t digits = 0;
        if (part > 0) {
            if (i >= n || s[i] != '.')
                return false;
            i++;
        }
        while (i < n && is_digit((unsigned char)s[i]) && digits < 3) {
            value = value * 10 + (unsigned)(s[i] - '0');
            digits++;
            i++;
        }
        if (digits == 0 || value > 255)
            return false;
    }
    return i == n;
}

/* IPv6-addr: up to 8 groups of 1..4 hex digits, at most one "::", and an
 * optional trailing IPv4 address counting as two groups.  "::" may stand
 * for a single zero group (RFC 4291 2.2; RFC 5321's ABNF wants at least two
 * but real software writes the shorter form). */
static bool ipv6_ok(const char *s, size_t n)
{
    size_t i = 0, groups = 0;
    bool compressed = false;

    if (n >= 2 && s[0] == ':' && s[1] == ':') {
        compressed = true;
        i = 2;
        if (i == n)
            return true; /* "::" */
    }
    for (;;) {
        size_t j = i;
        while (j < n && is_hex((unsigned char)s[j]))
            j++;
        if (j < n && s[j] == '.') { /* embedded IPv4 ends the address */
            if (!ipv4_ok(s + i, n - i))
                return false;
            groups += 2;
            break;
        }
        if (j == i || j - i > 4)
            return false;
        groups++;
        if (j == n)
            break;
        if (s[j] != ':' || ++j == n)
            return false; /* junk, or a dangling single ':' */
        if (s[j] == ':') {
            if (compressed)
                return false; /* a second "::" */
            compressed = true;
            if (++j == n)
                break;
        }
        if (groups > 8)
            return false;
        i = j;
    }
    return compressed ? groups <= 7 : groups == 8;
}

static bool prefix_nocase(const char *s, size_t n, const char *prefix)
{
    size_t i, len = strlen(prefix);

    if (n < len)
        return false;
    for (i = 0; i < len; i++)
        if (to_lower((unsigned char)s[i]) != to_lower((unsigned char)prefix[i]))
            return false;
    return true;
}

/* General-address-literal = Standardized-tag ":" 1*dcontent, where the tag
 * is an Ldh-str and dcontent is printable ASCII except "[", "\" and "]". */
static bool general_literal_ok(const char *s, size_t n)
{
    size_t i = 0;

    while (i < n && (is_alnum((unsigned char)s[i]) || s[i] == '-'))
        i++;
    if (i == 0 || i == n || s[i] != ':' || !is_alnum((unsigned char)s[i - 1]))
        return false;
    if (++i == n)
        return false;
    for (; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 33 || c > 126 || c == '[' || c == '\\' || c == ']')
            return false;
    }
    return true;
}

static bool literal_ok(const char *s, size_t n)
{
    if (n < 3 || s[0] != '[' || s[n - 1] != ']')
        return false;
    s++;
    n -= 2;
    /* ABNF literals are case-insensitive; "IPv6" is never a general tag. */
    if (prefix_nocase(s, n, "IPv6:"))
        return ipv6_ok(s + 5, n - 5);
    return ipv4_ok(s, n) || general_literal_ok(s, n);
}

bool addr_valid_literal(const char *s)
{
    size_t n;

    if (s == NULL)
        return false;
    n = strnlen(s, ADDR_DOMAIN_MAX + 1);
    return n <= ADDR_DOMAIN_MAX && literal_ok(s, n);
}

/* ---- local part ---- */

/* Dot-string = Atom *("." Atom); returns the end or NULL. */
static const char *scan_dot_string(const char *p, bool *nonascii)
{
    const char *atom = p;

    for (;;) {
        unsigned char c = (unsigned char)*p;
        if (c >= 0x80) {
            size_t k = utf8_seq_str(p);
            if (k == 0)
                return NULL;
            *nonascii = true;
            p += k;
        } else if (is_atext(c)) {
            p++;
        } else if (c == '.' && p > atom) {
            atom = ++p; /* an empty atom (".." or leading '.') fails below */
        } else {
            break;
        }
    }
    return p > atom ? p : NULL; /* also rejects a trailing '.' */
}

/* Quoted-string, p at the opening DQUOTE; returns past the closing one. */
static const char *scan_quoted(const char *p, bool *nonascii)
{
    for (p++;;) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            return p + 1;
        } else if (c == '\\') {
            /* quoted-pairSMTP = "\" %d32-126: also catches "\" at the end */
            c = (unsigned char)p[1];
            if (c < 32 || c > 126)
                return NULL;
            p += 2;
        } else if (is_qtext(c)) {
            p++;
        } else if (c >= 0x80) {
            size_t k = utf8_seq_str(p);
            if (k == 0)
                return NULL;
            *nonascii = true;
            p += k;
        } else {
            return NULL; /* control character or unterminated string */
        }
    }
}

/* ---- paths ---- */

/* A-d-l ":", p at the first '@'.  The route is checked and dropped. */
static const char *skip_route(const char *p, bool *nonascii)
{
    for (;;) {
        const char *d;
        if (*p != '@')
            return NULL;
        d = ++p;
        while (*p != '\0' && *p != ',' && *p != ':' && *p != '>')
            p++;
        if ((size_t)(p - d) > ADDR_DOMAIN_MAX ||
            !domain_syntax(d, (size_t)(p - d), nonascii))
            return NULL;
        if (*p == ':')
            return p + 1;
        if (*p != ',')
            return NULL;
        p++;
    }
}

/* Mailbox at p.  In a bracketed path the domain runs to '>', in a bare one
 * to a space or the end of the string; the caller checks what follows. */
static const char *scan_mailbox(const char *p, bool bare,
                                struct span_mailbox *sm)
{
    const char *q;

    sm->local = p;
    q = (*p == '"') ? scan_quoted(p, &sm->nonascii)
                    : scan_dot_string(p, &sm->nonascii);
    if (q == NULL || *q != '@')
        return NULL;
    sm->local_len = (size_t)(q - p);
    p = ++q;
    sm->domain = p;
    if (*p == '[') {
        /* dcontent may contain '>' so the literal ends at ']' only */
        q = strchr(p, ']');
        if (q == NULL)
            return NULL;
        q++;
        sm->literal = true;
        if (!literal_ok(p, (size_t)(q - p)))
            return NULL;
    } else {
        while (*q != '\0' && *q != (bare ? ' ' : '>'))
            q++;
        /* "user@example.com." names the same domain (the DNS root); as
         * Postfix does, the dot is accepted and dropped. */
        size_t n = (size_t)(q - p);
        if (n > 1 && p[n - 1] == '.' && p[n - 2] != '.')
            n--;
        if (!domain_syntax(p, n, &sm->nonascii))
            return NULL;
        sm->domain_len = n;
        return q;
    }
    sm->domain_len = (size_t)(q - p);
    return q;
}

static enum addr_result span_to_mailbox(const struct span_mailbox *sm,
                                        struct mailbox *mb, int flags)
{
    if (sm->local_len > ADDR_LOCAL_MAX || sm->domain_len > ADDR_DOMAIN_MAX)
        return ADDR_TOOLONG;
    if (sm->nonascii && !(flags & ADDR_ALLOW_UTF8))
        return ADDR_NEEDUTF8;
    memcpy(mb->local, sm->local, sm->local_len);
    mb->local[sm->local_len] = '\0';
    memcpy(mb->domain, sm->domain, sm->domain_len);
    mb->domain[sm->domain_len] = '\0';
    mb->literal = sm->literal;
    return ADDR_OK;
}

/* Returns the end of the path (past '>', or past a bare mailbox) or NULL. */
static const char *scan_path(const char *s, int flags, bool *is_null,
                             struct span_mailbox *sm)
{
    const char *p = s;

    if (*p != '<') {
        if (!(flags & ADDR_ALLOW_BARE))
            return NULL;
        p = scan_mailbox(p, true, sm);
        /* a bare literal must also be followed by a space or the end */
        return (p != NULL && (*p == '\0' || *p == ' ')) ? p : NULL;
    }
    p++;
    if (*p == '>') {
        *is_null = true;
        return (flags & ADDR_ALLOW_NULL) ? p + 1 : NULL;
    }
    if (*p == '@') {
        p = skip_route(p, &sm->nonascii);
        if (p == NULL)
            return NULL;
    }
    p = scan_mailbox(p, false, sm);
    return (p != NULL && *p == '>') ? p + 1 : NULL;
}

enum addr_result addr_parse_path(const char *s, const char **end,
                                 struct mailbox *mb, int flags)
{
    struct span_mailbox sm;
    enum addr_result r = ADDR_OK;
    bool is_null = false;
    const char *p;

    if (end != NULL)
        *end = s;
    if (mb == NULL)
        return ADDR_SYNTAX;
    memset(mb, 0, sizeof *mb);
    memset(&sm, 0, sizeof sm);
    if (s == NULL)
        return ADDR_SYNTAX;
    p = scan_path(s, flags, &is_null, &sm);
    if (p == NULL)
        return ADDR_SYNTAX;
    if (is_null)
        mb->null = true;
    else
        r = span_to_mailbox(&sm, mb, flags);
    if (r != ADDR_OK) {
        memset(mb, 0, sizeof *mb);
        return r;
    }
    if (end != NULL)
        *end = p;
    return ADDR_OK;
}

/* ---- helpers on parsed addresses ---- */

bool addr_format(const struct mailbox *mb, char *buf, size_t n)
{
    size_t l, d;

    if (buf == NULL || n == 0)
        return false;
    buf[0] = '\0';
    if (mb == NULL)
        return false;
    if (mb->null)
        return true;
    l = strnlen(mb->local, sizeof mb->local);
    d = strnlen(mb->domain, sizeof mb->domain);
    if (l == 0 || d == 0 || l == sizeof mb->local || d == sizeof mb->domain)
        return false; /* not something addr_parse_path produced */
    if (l + 1 + d >= n)
        return false;
    memcpy(buf, mb->local, l);
    buf[l] = '@';
    memcpy(buf + l + 1, mb->domain, d);
    buf[l + 1 + d] = '\0';
    return true;
}

/* Only ASCII is folded: U-labels are compared as written because case
 * folding of Unicode would need tables (and IDNA2008 labels are already
 * expected to be lower case). */
void addr_domain_key(const char *domain, char *buf, size_t n)
{
    size_t i;

    if (buf == NULL || n == 0)
        return;
    for (i = 0; domain != NULL && domain[i] != '\0' && i + 1 < n; i++)
        buf[i] = (char)to_lower((unsigned char)domain[i]);
    buf[i] = '\0';
}

/* The '@' after the local part: a quoted local part may contain '@', and
 * so may a General-address-literal ("[tag:x@y]"), so neither the first
 * nor the last '@' will do for every address. */
const char *addr_domain_of(const char *address)
{
    const char *p = address;

    if (p == NULL)
        return NULL;
    if (*p == '"') {
        for (p++; *p != '\0' && *p != '"'; p++)
            if (*p == '\\' && p[1] != '\0')
                p++;
        if (*p++ != '"')
            return NULL;
    } else {
        p += strcspn(p, "@");
    }
    return (*p == '@' && p[1] != '\0') ? p + 1 : NULL;
}
