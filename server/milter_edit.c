/* milter_edit.c - applies the header and body changes milters asked for
 * (milter.h) while copying the queued message, so that no more than one
 * header at a time and one buffer of body is ever in memory. */
#include "milter.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* One header of the result: an original one, or one a milter set. */
struct slot {
    const struct milter_span *orig;          /* NULL: set by a milter */
    const struct milter_header_edit *edit;   /* its text when orig is NULL */
    char *name;                              /* orig's name, read on demand */
};

struct rewrite {
    const struct milter_original *o;
    struct slot *slots;
    size_t n;
    char err[256];
};

/* The name of an original header (up to its colon), read from the file. */
static const char *slot_name(struct rewrite *w, struct slot *s)
{
    if (!s->orig)
        return s->edit->name;
    if (s->name)
        return s->name;
    char buf[1001];
    size_t want = s->orig->len < sizeof buf - 1 ? (size_t)s->orig->len
                                                : sizeof buf - 1;
    ssize_t got = pread(w->o->fd, buf, want, (off_t)s->orig->off);
    buf[got > 0 ? got : 0] = '\0';
    char *colon = strchr(buf, ':');
    if (colon)
        *colon = '\0';
    else
        buf[0] = '\0';   /* not a header: matches no name */
    size_t len = strlen(buf);
    while (len && (buf[len - 1] == ' ' || buf[len - 1] == '\t'))
        buf[--len] = '\0';
    s->name = strdup(buf);
    return s->name ? s->name : "";
}

static void insert_slot(struct rewrite *w, size_t at,
                        const struct milter_header_edit *h)
{
    if (at > w->n)
        at = w->n;
    memmove(&w->slots[at + 1], &w->slots[at], (w->n - at) * sizeof w->slots[0]);
    w->slots[at] = (struct slot){NULL, h, NULL};
    w->n++;
}

/* SMFIR_CHGHEADER: the index-th (from 1) header of that name gets the new
 * value, or goes when the value is empty; one that is not there is added
 * (unless it was to be deleted). */
static void change_header(struct rewrite *w, const struct milter_header_edit *h)
{
    uint32_t want = h->index ? h->index : 1, seen = 0;
    for (size_t i = 0; i < w->n; i++) {
        if (strcasecmp(slot_name(w, &w->slots[i]), h->name) || ++seen < want)
            continue;
        free(w->slots[i].name);
        if (!h->value[0]) {
            memmove(&w->slots[i], &w->slots[i + 1],
                    (w->n - i - 1) * sizeof w->slots[0]);
            w->n--;
        } else {
            w->slots[i] = (struct slot){NULL, h, NULL};
        }
        return;
    }
    if (h->value[0])
        insert_slot(w, w->n, h);
}

static void apply_header_edits(struct rewrite *w, const struct milter_edits *e)
{
    for (size_t i = 0; i < e->nheaders; i++) {
        const struct milter_header_edit *h = &e->headers[i];
        if (h->cmd == SMFIR_ADDHEADER)
            insert_slot(w, w->n, h);
        else if (h->cmd == SMFIR_INSHEADER)
            insert_slot(w, h->index, h);
        else
            change_header(w, h);
    }
}

/* Copies [off, off + len) of fd to out. */
static bool copy_range(int fd, uint64_t off, uint64_t len,
                       void (*out)(void *, const void *, size_t), void *ctx)
{
    static char buf[65536];
    while (len) {
        size_t want = len < sizeof buf ? (size_t)len : sizeof buf;
        ssize_t got = pread(fd, buf, want, (off_t)off);
        if (got <= 0) {
            if (got == 0)
                errno = EIO;   /* the file is shorter than recorded */
            return false;
        }
        out(ctx, buf, (size_t)got);
        off += (uint64_t)got;
        len -= (uint64_t)got;
    }
    return true;
}

/* "Name: value" with the value's LF line ends made CRLF. */
static void write_header(const struct milter_header_edit *h,
                         void (*out)(void *, const void *, size_t), void *ctx)
{
    out(ctx, h->name, strlen(h->name));
    out(ctx, h->leading_space ? ":" : ": ", h->leading_space ? 1 : 2);
    for (const char *p = h->value; *p;) {
        size_t run = strcspn(p, "\r\n");
        out(ctx, p, run);
        p += run;
        if (*p == '\r')
            p++;
        if (*p == '\n') {
            out(ctx, "\r\n", 2);
            p++;
        }
    }
    out(ctx, "\r\n", 2);
}

/* The replacement body, after the empty line, ending in CRLF. */
static bool write_new_body(const struct milter_edits *e,
                           void (*out)(void *, const void *, size_t), void *ctx)
{
    char last[2] = "";
    out(ctx, "\r\n", 2);
    if (!e->body_size)
        return true;
    if (pread(e->body_fd, last, 2, (off_t)(e->body_size >= 2 ? e->body_size - 2
                                                              : 0)) < 0 ||
        !copy_range(e->body_fd, 0, e->body_size, out, ctx))
        return false;
    if (e->body_size < 2 || memcmp(last, "\r\n", 2))
        out(ctx, "\r\n", 2);
    return true;
}

static bool write_result(struct rewrite *w, const struct milter_edits *e,
                         void (*out)(void *, const void *, size_t), void *ctx)
{
    const struct milter_original *o = w->o;
    if (!copy_range(o->fd, 0, o->prefix, out, ctx))
        return false;
    for (size_t i = 0; i < w->n; i++) {
        const struct slot *s = &w->slots[i];
        if (s->orig && !copy_range(o->fd, s->orig->off, s->orig->len, out, ctx))
            return false;
        if (!s->orig)
            write_header(s->edit, out, ctx);
    }
    if (e->body_fd >= 0)
        return write_new_body(e, out, ctx);
    return copy_range(o->fd, o->body_off, o->size - o->body_off, out, ctx);
}

bool milter_rewrite(const struct milter_original *o, const struct milter_edits *e,
                    void (*out)(void *ctx, const void *data, size_t len),
                    void *ctx, char *err, size_t n)
{
    struct rewrite w = {.o = o};
    w.slots = calloc(o->nhdrs + e->nheaders + 1, sizeof *w.slots);
    if (!w.slots) {
        snprintf(err, n, "out of memory");
        return false;
    }
    for (size_t i = 0; i < o->nhdrs; i++)
        w.slots[w.n++].orig = &o->hdrs[i];
    apply_header_edits(&w, e);
    bool ok = write_result(&w, e, out, ctx);
    if (!ok)
        snprintf(err, n, "reading the message back: %s", strerror(errno));
    for (size_t i = 0; i < w.n; i++)
        free(w.slots[i].name);
    free(w.slots);
    return ok;
}
