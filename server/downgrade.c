/* downgrade.c - 8-bit to 7-bit MIME conversion (see downgrade.h).
 *
 * One walker serves both passes so that they number the leaf parts the
 * same way: the planning pass records which leaves hold 8-bit octets, the
 * writing pass re-encodes exactly those.  The message is read in line
 * segments of at most SEG_MAX bytes; boundary lines are short, so only a
 * complete segment at the start of a line is tested against them. */
#include "downgrade.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define SEG_MAX 4096          /* longest piece of a line handled at once */
#define BOUNDARY_MAX 200      /* RFC 2046 allows 70; be lenient */
#define FIELD_VALUE_MAX 2048  /* Content-Type value looked at */
#define QP_LINE 76            /* RFC 2045 6.7 rule 5, counting the "=" */
#define OUT_BUF 16384
/* A numeric macro as a string, for the texts of downgrade_problem_text. */
#define DG_STR_(x) #x
#define DG_STR(x) DG_STR_(x)

enum part_kind { P_OPAQUE, P_LEAF, P_MULTI, P_MESSAGE };
enum cte { CTE_IDENTITY, CTE_ENCODED };

struct part_info {
    enum part_kind kind;
    enum cte cte;
    bool cte_8bit;            /* labelled 8bit or binary */
    bool text;                /* line-oriented: text/ or message/ */
    bool labelled_text;       /* a Content-Type field says text/ */
    bool digest;              /* multipart/digest: parts default to message */
    enum dg_problem why;      /* P_OPAQUE: why its body stays as it is */
    char boundary[BOUNDARY_MAX + 1];
};

struct level {
    char boundary[BOUNDARY_MAX + 1];
    size_t blen;
    bool digest;
    /* 8-bit text before the first delimiter: a preamble, replaced by '?',
     * only once a delimiter proves it was one.  A multipart whose boundary
     * never comes has its whole body there, real text included. */
    bool preamble_8bit;
};

struct walker {
    bool writing;
    struct dg_plan *plan;        /* planning: filled in; writing: read */
    dg_sink sink;
    void *ctx;
    bool failed;

    struct level lv[DOWNGRADE_MAX_DEPTH];
    int depth;

    bool in_headers;
    bool top;                    /* the header block is the message's own */
    bool in_multi;               /* ... or a multipart's body part's */
    char *hdr;
    size_t hlen;
    bool hdr_full;               /* too long: passed on as it came */

    bool line_start;
    bool qp;                     /* the current body is being encoded */
    bool leaf;                   /* the current body is a leaf part ... */
    bool convertible;            /* ... with an identity encoding */
    bool filler;                 /* ... or a preamble or an epilogue */
    bool preamble;               /* the filler is lv[depth - 1]'s preamble */
    enum dg_problem stuck;       /* ... or why it cannot be converted */
    size_t leaf_index;
    size_t leaf_count;

    unsigned col;                /* quoted-printable output column */
    int pending_ws;              /* blank held back: is it at line end? */
    bool binary;                 /* not text: line ends are data too */
    bool pending_eol;            /* binary: a CRLF held back: is it the
                                    one before a boundary? */
    bool at_eof;                 /* the last, unterminated piece */

    char out[OUT_BUF];
    size_t olen;
};

/* ------------------------------------------------------------ output */

static void flush_out(struct walker *w)
{
    if (w->olen && !w->failed && !w->sink(w->ctx, w->out, w->olen))
        w->failed = true;
    w->olen = 0;
}

static void emit(struct walker *w, const char *p, size_t len)
{
    if (!w->writing)
        return;
    while (len) {
        if (w->olen == sizeof w->out)
            flush_out(w);
        size_t n = sizeof w->out - w->olen;
        if (n > len)
            n = len;
        memcpy(w->out + w->olen, p, n);
        w->olen += n;
        p += n;
        len -= n;
    }
}

static void emit_str(struct walker *w, const char *s)
{
    emit(w, s, strlen(s));
}

/* ------------------------------------------------- quoted-printable */

static void qp_room(struct walker *w, unsigned need)
{
    if (w->col + need > QP_LINE - 1) {   /* keep a column for the "=" */
        emit_str(w, "=\r\n");
        w->col = 0;
    }
}

static void qp_encoded(struct walker *w, unsigned char c)
{
    static const char hex[] = "0123456789ABCDEF";
    char e[3] = {'=', hex[c >> 4], hex[c & 15]};
    qp_room(w, 3);
    emit(w, e, 3);
    w->col += 3;
}

static void qp_literal(struct walker *w, unsigned char c)
{
    qp_room(w, 1);
    /* A "-" starting an output line could, after a soft break, make
     * "--boundary" from text that was in the middle of a line. */
    if (w->col == 0 && c == '-') {
        qp_encoded(w, c);
        return;
    }
    emit(w, (const char *)&c, 1);
    w->col++;
}

/* Ends the current output line for good (a hard line break). */
static void qp_hard_break(struct walker *w)
{
    if (w->pending_ws)
        qp_encoded(w, (unsigned char)w->pending_ws);
    w->pending_ws = 0;
    emit_str(w, "\r\n");
    w->col = 0;
}

/* A blank at the end of a line must be encoded (RFC 2045 6.7 rule 3),
 * so each one waits until the next octet shows where it stands.  Text
 * keeps its line breaks as hard ones (rule 4); in other types a CRLF is
 * data and is encoded, except the one before a boundary, which belongs to
 * the delimiter: it waits too (pending_eol). */
static void qp_segment(struct walker *w, const unsigned char *p, size_t len,
                       bool eol)
{
    if (w->pending_eol && (len || eol)) {
        w->pending_eol = false;
        if (w->pending_ws) {
            qp_literal(w, (unsigned char)w->pending_ws);
            w->pending_ws = 0;
        }
        qp_encoded(w, '\r');
        qp_encoded(w, '\n');
    }
    for (size_t i = 0; i < len; i++) {
        if (w->pending_ws) {
            qp_literal(w, (unsigned char)w->pending_ws);
            w->pending_ws = 0;
        }
        unsigned char c = p[i];
        if (c == ' ' || c == '\t')
            w->pending_ws = c;
        else if (c >= 33 && c <= 126 && c != '=')
            qp_literal(w, c);
        else
            qp_encoded(w, c);
    }
    if (eol && w->binary)
        w->pending_eol = true;
    else if (eol)
        qp_hard_break(w);
}

/* The body being encoded ends (a boundary or the end of the message). */
static void qp_end(struct walker *w)
{
    if (w->pending_eol) {
        w->pending_eol = false;
        qp_hard_break(w);
    } else if (w->pending_ws) {
        qp_encoded(w, (unsigned char)w->pending_ws);
        w->pending_ws = 0;
    }
}

/* ------------------------------------------------------------ headers */

static bool has_8bit(const char *p, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)p[i] & 0x80)
            return true;
    return false;
}

/* Length of the field starting at p (its continuation lines included). */
static size_t field_len(const char *p, const char *end)
{
    const char *q = p;
    for (;;) {
        const char *nl = memchr(q, '\n', (size_t)(end - q));
        if (!nl)
            return (size_t)(end - p);
        q = nl + 1;
        if (q == end || (*q != ' ' && *q != '\t'))
            return (size_t)(q - p);
    }
}

/* Where the value of field f starts when it is called name (blanks before
 * the colon are obsolete syntax, RFC 5322 4.5.3, but still seen); 0 when
 * it is another field. */
static size_t field_is(const char *f, size_t flen, const char *name)
{
    size_t n = strlen(name);
    if (flen <= n || strncasecmp(f, name, n))
        return 0;
    while (n < flen && (f[n] == ' ' || f[n] == '\t'))
        n++;
    return n < flen && f[n] == ':' ? n + 1 : 0;
}

/* The unfolded, trimmed value of the first field called name; false when
 * there is none.  Long values are cut at out's size. */
static bool field_value(const char *hdr, size_t hlen, const char *name,
                        char *out, size_t n)
{
    const char *p = hdr, *end = hdr + hlen;
    while (p < end) {
        size_t flen = field_len(p, end);
        size_t start = field_is(p, flen, name);
        if (start) {
            size_t k = 0;
            for (size_t i = start; i < flen && k + 1 < n; i++)
                if (p[i] != '\r' && p[i] != '\n')
                    out[k++] = p[i];
            while (k && (out[k - 1] == ' ' || out[k - 1] == '\t'))
                k--;
            out[k] = '\0';
            size_t lead = strspn(out, " \t");
            memmove(out, out + lead, k - lead + 1);
            return true;
        }
        p += flen;
    }
    return false;
}

/* Copies the lower-cased token at *s (stopping at ";", blanks, "(" or
 * "="), advancing *s. */
static void take_token(const char **s, char *out, size_t n)
{
    size_t k = 0;
    const char *p = *s;
    while (*p && !strchr("; \t(=", *p)) {
        if (k + 1 < n)
            out[k++] = (char)(*p >= 'A' && *p <= 'Z' ? *p + 32 : *p);
        p++;
    }
    out[k] = '\0';
    *s = p;
}

/* Finds the boundary parameter in a Content-Type value (RFC 2045 5.1).
 * One longer than n - 1 gives "": cut short it would never match. */
static void boundary_param(const char *v, char *out, size_t n)
{
    out[0] = '\0';
    const char *p = strchr(v, ';');
    while (p && *p) {
        p += strspn(p, "; \t");
        char attr[32];
        take_token(&p, attr, sizeof attr);
        p += strspn(p, " \t");
        if (*p != '=') {
            p = strchr(p, ';');
            continue;
        }
        p += 1 + strspn(p + 1, " \t");
        size_t k = 0;
        bool cut = false;
        if (*p == '"') {
            for (p++; *p && *p != '"'; p++) {
                if (*p == '\\' && p[1])
                    p++;
                if (k + 1 < n)
                    out[k++] = *p;
                else
                    cut = true;
            }
        } else {
            while (*p && !strchr("; \t", *p)) {
                if (k + 1 < n)
                    out[k++] = *p;
                else
                    cut = true;
                p++;
            }
        }
        out[k] = '\0';
        if (!strcmp(attr, "boundary")) {
            if (cut)
                out[0] = '\0';
            return;
        }
        out[0] = '\0';
        p = strchr(p, ';');
    }
}

static void classify_part(const char *hdr, size_t hlen, bool in_digest,
                          struct part_info *pi)
{
    char v[FIELD_VALUE_MAX] = "", type[128] = "";
    memset(pi, 0, sizeof *pi);
    if (field_value(hdr, hlen, "Content-Transfer-Encoding", v, sizeof v)) {
        const char *p = v;
        char cte[32];
        take_token(&p, cte, sizeof cte);
        pi->cte_8bit = !strcmp(cte, "8bit") || !strcmp(cte, "binary");
        if (strcmp(cte, "7bit") && !pi->cte_8bit)
            pi->cte = CTE_ENCODED;
    }
    if (field_value(hdr, hlen, "Content-Type", v, sizeof v)) {
        const char *p = v;
        take_token(&p, type, sizeof type);
    }
    pi->labelled_text = !strncmp(type, "text/", 5);
    if (!type[0] || !strchr(type, '/'))   /* RFC 2045 5.2 defaults */
        snprintf(type, sizeof type, "%s", in_digest ? "message/rfc822" : "text/plain");
    pi->text = !strncmp(type, "text/", 5) || !strncmp(type, "message/", 8);
    if (!strncmp(type, "multipart/", 10)) {
        boundary_param(v, pi->boundary, sizeof pi->boundary);
        pi->kind = pi->boundary[0] ? P_MULTI : P_OPAQUE;
        pi->why = DG_UNENCODABLE_TYPE;   /* its parts cannot be found */
        pi->digest = !strcmp(type, "multipart/digest");
    } else if (!strcmp(type, "message/rfc822")) {
        pi->kind = P_MESSAGE;
    } else if (!strncmp(type, "message/", 8) && strncmp(type, "message/global", 14)) {
        pi->kind = P_OPAQUE;   /* partial, external-body: 7bit by rule */
        pi->why = DG_UNENCODABLE_TYPE;
    } else {
        /* message/global and its -headers and -delivery-status kin may be
         * encoded (RFC 6532 3.5, RFC 6533 6) */
        pi->kind = P_LEAF;
    }
}

/* Writes the header block, dropping the fields named in drop (NULL-
 * terminated) and putting add after the rest. */
static void emit_headers(struct walker *w, const char *const *drop,
                         const char *add)
{
    const char *p = w->hdr, *end = w->hdr + w->hlen;
    while (p < end) {
        size_t flen = field_len(p, end);
        bool keep = true;
        for (size_t i = 0; drop && drop[i]; i++)
            if (field_is(p, flen, drop[i]))
                keep = false;
        if (keep)
            emit(w, p, flen);
        p += flen;
    }
    if (add)
        emit_str(w, add);
}

/* ------------------------------------------------------------ parts */

static const char *const DROP_CTE[] = {"Content-Transfer-Encoding", NULL};
static const char *const DROP_MIME[] = {"Content-Transfer-Encoding",
                                        "Content-Type", "MIME-Version", NULL};
static const char *const DROP_MIME_ONLY[] = {"Content-Transfer-Encoding",
                                             "MIME-Version", NULL};

static bool push_leaf(struct walker *w)
{
    struct dg_plan *pl = w->plan;
    if (w->leaf_count >= DOWNGRADE_MAX_PARTS)
        return false;
    w->leaf_index = w->leaf_count++;
    if (!w->writing && w->leaf_index >= pl->nleaves) {
        size_t cap = pl->nleaves ? pl->nleaves * 2 : 16;
        unsigned char *more = realloc(pl->leaf_8bit, cap);
        if (!more) {
            w->failed = true;
            return false;
        }
        memset(more + pl->nleaves, 0, cap - pl->nleaves);
        pl->leaf_8bit = more;
        pl->nleaves = cap;
    }
    return true;
}

/* A leaf's header block: re-labelled when its body gets encoded. */
static void end_leaf_headers(struct walker *w, const struct part_info *pi,
                             bool nonmime)
{
    w->leaf = push_leaf(w);
    w->convertible = w->leaf && pi->cte == CTE_IDENTITY;
    w->stuck = !w->leaf ? DG_TOO_MANY_PARTS
               : w->convertible ? DG_NONE : DG_ENCODED_8BIT;
    w->qp = w->writing && w->convertible && w->leaf_index < w->plan->nleaves &&
            w->plan->leaf_8bit[w->leaf_index];
    w->binary = !nonmime && !pi->text;
    w->pending_eol = false;
    if (!w->qp)
        emit(w, w->hdr, w->hlen);
    else if (nonmime && pi->labelled_text)   /* keep its charset */
        emit_headers(w, DROP_MIME_ONLY, "MIME-Version: 1.0\r\n"
                     "Content-Transfer-Encoding: quoted-printable\r\n");
    else if (nonmime)
        emit_headers(w, DROP_MIME, "MIME-Version: 1.0\r\n"
                     "Content-Type: text/plain; charset=unknown-8bit\r\n"
                     "Content-Transfer-Encoding: quoted-printable\r\n");
    else
        emit_headers(w, DROP_CTE, "Content-Transfer-Encoding: quoted-printable\r\n");
    w->in_headers = false;
}

/* A multipart's or message/rfc822's header block.  A multipart nested
 * deeper than the limit is not walked into: its body stays as it is. */
static void end_composite_headers(struct walker *w, const struct part_info *pi)
{
    bool label_7bit = w->writing && w->plan->convert && pi->cte_8bit;
    if (pi->kind == P_MULTI && w->depth < DOWNGRADE_MAX_DEPTH) {
        struct level *l = &w->lv[w->depth++];
        memcpy(l->boundary, pi->boundary, sizeof l->boundary);
        l->blen = strlen(pi->boundary);
        l->digest = pi->digest;
        l->preamble_8bit = false;
        w->filler = w->preamble = true;   /* the preamble */
    } else if (pi->kind == P_MULTI) {
        w->stuck = DG_TOO_DEEP;
    }
    /* a composite part's body is never encoded itself */
    if (label_7bit)
        emit_headers(w, DROP_CTE, "Content-Transfer-Encoding: 7bit\r\n");
    else
        emit(w, w->hdr, w->hlen);
    w->in_headers = pi->kind == P_MESSAGE;   /* the enclosed header block */
}

/* The blank line after a header block was seen. */
static void end_headers(struct walker *w)
{
    struct part_info pi;
    bool digest = w->in_multi && w->depth > 0 && w->lv[w->depth - 1].digest;
    bool nonmime = false;
    w->leaf = w->qp = w->convertible = w->filler = w->preamble = false;
    w->stuck = DG_NONE;
    if (w->hdr_full) {
        memset(&pi, 0, sizeof pi);
        pi.kind = P_OPAQUE;
        pi.why = DG_HEADER_TOO_LONG;
    } else {
        char v[8];
        classify_part(w->hdr, w->hlen, digest, &pi);
        if (w->top && !field_value(w->hdr, w->hlen, "MIME-Version", v, sizeof v)) {
            nonmime = true;   /* not MIME at all: one text part */
            pi.kind = P_LEAF;
            pi.cte = CTE_IDENTITY;
        }
    }
    switch (pi.kind) {
    case P_LEAF:
        end_leaf_headers(w, &pi, nonmime);
        break;
    case P_MULTI:
    case P_MESSAGE:
        end_composite_headers(w, &pi);
        break;
    case P_OPAQUE:
        if (!w->hdr_full)
            emit(w, w->hdr, w->hlen);
        w->stuck = pi.why;
        w->in_headers = false;
        break;
    }
    w->top = w->in_multi = false;
    w->hlen = 0;
    w->hdr_full = false;
}

/* Is the line p a delimiter of an open multipart?  *level: which one. */
static bool is_boundary(const struct walker *w, const char *p, size_t len,
                        int *level, bool *close)
{
    while (len && (p[len - 1] == '\r' || p[len - 1] == '\n' ||
                   p[len - 1] == ' ' || p[len - 1] == '\t'))
        len--;
    if (len < 3 || p[0] != '-' || p[1] != '-')
        return false;
    for (int i = w->depth - 1; i >= 0; i--) {
        const struct level *l = &w->lv[i];
        size_t rest = len - 2;
        if (rest < l->blen || memcmp(p + 2, l->boundary, l->blen))
            continue;
        rest -= l->blen;
        if (rest == 0 || (rest == 2 && !memcmp(p + 2 + l->blen, "--", 2))) {
            *level = i;
            *close = rest == 2;
            return true;
        }
    }
    return false;
}

static void note_problem(struct dg_plan *pl, enum dg_problem why);

static void at_boundary(struct walker *w, const char *p, size_t len,
                        int level, bool close)
{
    if (w->in_headers && !w->hdr_full)
        emit(w, w->hdr, w->hlen);   /* a part cut short: as it came */
    if (w->qp)
        qp_end(w);
    w->hlen = 0;
    w->hdr_full = false;
    emit(w, p, len);
    if (!w->writing) {
        if (w->lv[level].preamble_8bit)   /* it was a preamble after all */
            w->plan->filler_8bit = true;
        /* levels inside this one end here unseen: their "preamble" was
         * all they had, and real text */
        for (int k = level + 1; k < w->depth; k++)
            if (w->lv[k].preamble_8bit)
                note_problem(w->plan, DG_UNENCODABLE_TYPE);
    }
    w->lv[level].preamble_8bit = false;
    w->preamble = false;
    w->depth = close ? level : level + 1;   /* an epilogue is the parent's */
    w->in_headers = w->in_multi = !close;
    w->qp = w->leaf = w->convertible = false;
    w->filler = close;   /* the epilogue */
    w->stuck = DG_NONE;
    w->col = 0;
    w->pending_ws = 0;
    w->pending_eol = false;
}

/* Records 8-bit data that stays 8-bit; the first reason is kept. */
static void note_problem(struct dg_plan *pl, enum dg_problem why)
{
    pl->has_8bit = pl->residual_8bit = true;
    if (pl->problem == DG_NONE)
        pl->problem = why;
    if (why != DG_HEADER_8BIT && pl->body_problem == DG_NONE)
        pl->body_problem = why;
}

static void header_segment(struct walker *w, const char *p, size_t len)
{
    if (!w->writing && has_8bit(p, len))
        note_problem(w->plan, DG_HEADER_8BIT);
    if (!w->hdr_full && w->hlen + len <= DOWNGRADE_HEADER_MAX) {
        memcpy(w->hdr + w->hlen, p, len);
        w->hlen += len;
        return;
    }
    if (!w->hdr_full)
        emit(w, w->hdr, w->hlen);
    w->hdr_full = true;
    emit(w, p, len);
}

/* Preamble and epilogue text is there for readers without MIME only
 * (RFC 2046 5.1.1): an 8-bit octet there becomes "?". */
static void emit_filler(struct walker *w, const char *p, size_t len)
{
    char seg[SEG_MAX];
    for (size_t i = 0; i < len; i++)
        seg[i] = (unsigned char)p[i] & 0x80 ? '?' : p[i];
    emit(w, seg, len);
}

static void body_segment(struct walker *w, const char *p, size_t len, bool eol)
{
    if (w->writing) {
        if (w->qp)
            qp_segment(w, (const unsigned char *)p, eol ? len - 2 : len, eol);
        else if (w->filler && w->plan->filler_8bit && len <= SEG_MAX)
            emit_filler(w, p, len);   /* 8-bit only in proven fillers */
        else
            emit(w, p, len);
        return;
    }
    if (!has_8bit(p, len))
        return;
    w->plan->has_8bit = true;
    if (w->convertible)
        w->plan->leaf_8bit[w->leaf_index] = 1;
    else if (w->filler && w->preamble && w->depth > 0)
        w->lv[w->depth - 1].preamble_8bit = true;
    else if (w->filler)
        w->plan->filler_8bit = true;
    else
        note_problem(w->plan, w->stuck != DG_NONE ? w->stuck : DG_UNENCODABLE_TYPE);
}

/* One piece of a line; eol: it ends the line (with CRLF). */
static void walk_segment(struct walker *w, const char *p, size_t len, bool eol)
{
    bool starts = w->line_start;
    int level;
    bool close;
    w->line_start = eol;
    if (starts && (eol || w->at_eof) && w->depth > 0 &&
        is_boundary(w, p, len, &level, &close)) {
        at_boundary(w, p, len, level, close);
        return;
    }
    if (w->in_headers) {
        if (starts && eol && len == 2 && p[0] == '\r') {
            end_headers(w);
            emit(w, p, len);
        } else {
            header_segment(w, p, len);
        }
        return;
    }
    body_segment(w, p, len, eol && len >= 2 && p[len - 2] == '\r');
}

static void walk_end(struct walker *w)
{
    if (w->in_headers && !w->hdr_full)
        emit(w, w->hdr, w->hlen);
    if (w->qp)
        qp_end(w);
    flush_out(w);
}

/* Reads the message (plan->data_len octets from fd's start) in line
 * segments: a queue file holds its envelope after the message. */
static bool walk(int fd, struct walker *w)
{
    static char buf[65536];
    char seg[SEG_MAX];
    size_t slen = 0;
    w->hdr = malloc(DOWNGRADE_HEADER_MAX);
    if (!w->hdr || lseek(fd, 0, SEEK_SET) < 0) {
        free(w->hdr);
        return false;
    }
    w->in_headers = w->top = w->line_start = true;
    uint64_t left = w->plan->data_len;
    ssize_t got = 0;
    while (!w->failed && left > 0 &&
           (got = read(fd, buf, left < sizeof buf ? (size_t)left : sizeof buf)) != 0) {
        if (got < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        for (ssize_t i = 0; i < got && !w->failed; i++) {
            seg[slen++] = buf[i];
            bool eol = buf[i] == '\n';
            /* never split a CRLF pair between two segments */
            if (eol || slen == sizeof seg ||
                (slen >= sizeof seg - 1 && buf[i] != '\r')) {
                walk_segment(w, seg, slen, eol);
                slen = 0;
            }
        }
        if (!w->writing)
            w->plan->size += (uint64_t)got;
        left -= (uint64_t)got;
    }
    bool ok = got >= 0 && !w->failed;   /* < 0 only for a read error */
    if (ok && slen) {
        w->at_eof = true;   /* a last line without CRLF may still be a delimiter */
        walk_segment(w, seg, slen, false);
    }
    if (ok)
        walk_end(w);
    free(w->hdr);
    return ok && !w->failed && lseek(fd, 0, SEEK_SET) == 0;
}

/* ------------------------------------------------------------ API */

static bool count_sink(void *ctx, const char *p, size_t len)
{
    (void)p;
    *(uint64_t *)ctx += len;
    return true;
}

bool downgrade_plan(int fd, uint64_t len, struct dg_plan *plan)
{
    memset(plan, 0, sizeof *plan);
    plan->data_len = len;
    struct walker w = {.plan = plan};
    if (!walk(fd, &w))
        return false;
    for (int i = 0; i < w.depth; i++)
        if (w.lv[i].preamble_8bit)
            note_problem(plan, DG_UNENCODABLE_TYPE);
    plan->convert = plan->filler_8bit;
    for (size_t i = 0; i < plan->nleaves && !plan->convert; i++)
        plan->convert = plan->leaf_8bit[i] != 0;
    if (!plan->convert)
        return true;
    uint64_t size = 0;
    if (!downgrade_write(fd, plan, count_sink, &size))
        return false;
    plan->size = size;
    return true;
}

bool downgrade_write(int fd, const struct dg_plan *plan, dg_sink sink, void *ctx)
{
    struct walker w = {.writing = true, .plan = (struct dg_plan *)plan,
                       .sink = sink, .ctx = ctx};
    return walk(fd, &w);
}

void downgrade_free(struct dg_plan *plan)
{
    free(plan->leaf_8bit);
    memset(plan, 0, sizeof *plan);
}

const char *downgrade_problem_text(enum dg_problem problem)
{
    switch (problem) {
    case DG_NONE:
        break;
    case DG_HEADER_8BIT:
        return "8-bit octets in header text, which MIME cannot encode";
    case DG_ENCODED_8BIT:
        return "8-bit octets inside a part that is already encoded "
               "(base64, quoted-printable or another encoding)";
    case DG_TOO_DEEP:
        return "8-bit octets in a part nested more than "
               DG_STR(DOWNGRADE_MAX_DEPTH) " multiparts deep";
    case DG_TOO_MANY_PARTS:
        return "8-bit octets after the first " DG_STR(DOWNGRADE_MAX_PARTS)
               " MIME parts";
    case DG_HEADER_TOO_LONG:
        return "8-bit octets in a MIME part whose header block is longer than "
               DG_STR(DOWNGRADE_HEADER_MAX) " bytes";
    case DG_UNENCODABLE_TYPE:
        return "8-bit octets in a part that must not be encoded (a multipart "
               "without boundary, message/partial or message/external-body)";
    }
    return "no problem";
}
