/* config.c - the shared "key = value" file reader. */
#include "config.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "util.h"

static void report_at(cfg_report report, void *ctx, const char *path,
                      int lineno, const char *msg)
{
    char buf[CFG_LINE_MAX + 512];
    snprintf(buf, sizeof buf, "%s:%d: %s", path, lineno, msg);
    report(ctx, buf);
}

/* Keys already seen, so that a second setting of one is an error rather
 * than a silent override: which one was meant is not ours to guess. */
#define CFG_KEYS_MAX 128
#define CFG_KEY_MAX 64

struct seen_keys {
    char key[CFG_KEYS_MAX][CFG_KEY_MAX];
    int line[CFG_KEYS_MAX];
    size_t n;
};

/* The line where key was first set, or 0 (and key is recorded). */
static int seen_before(struct seen_keys *k, const char *key, int lineno)
{
    for (size_t i = 0; i < k->n; i++)
        if (!strcmp(k->key[i], key))
            return k->line[i];
    if (k->n < CFG_KEYS_MAX && str_copy(k->key[k->n], key, CFG_KEY_MAX))
        k->line[k->n++] = lineno;
    return 0;
}

/* Handles one non-comment line; returns false after reporting a problem. */
static bool handle_line(char *line, const char *path, int lineno, cfg_cb cb,
                        cfg_report report, void *ctx, struct seen_keys *seen)
{
    char *eq = strchr(line, '=');
    if (!eq) {
        report_at(report, ctx, path, lineno, "expected \"key = value\"");
        return false;
    }
    *eq = '\0';
    char *key = str_trim(line);
    char *value = str_trim(eq + 1);
    char msg[1024];
    if (!*key) {
        report_at(report, ctx, path, lineno, "missing key before '='");
        return false;
    }
    int first = seen_before(seen, key, lineno);
    if (first) {
        snprintf(msg, sizeof msg, "%s: set again (first on line %d)", key, first);
        report_at(report, ctx, path, lineno, msg);
        return false;
    }
    char err[512] = "";
    if (cb(ctx, key, value, err, sizeof err) != 0) {
        /* "ca_file = x   # comment": the most common mistake of all */
        const char *hint = strstr(value, " #") || strstr(value, "\t#")
                               ? " (a '#' starts a comment only at the "
                                 "beginning of a line)" : "";
        snprintf(msg, sizeof msg, "%s: %s%s", key, err[0] ? err : "bad value",
                 hint);
        report_at(report, ctx, path, lineno, msg);
        return false;
    }
    return true;
}

/* Reads one line into buf (without its newline).  Returns false at end of
 * file.  *too_long: the rest of the line was skipped; *nul: it held a NUL,
 * which would silently cut a value short. */
static bool read_line(FILE *f, char *buf, size_t size, bool *too_long, bool *nul)
{
    size_t len = 0;
    int c;
    *too_long = *nul = false;
    while ((c = getc(f)) != EOF && c != '\n') {
        if (c == '\0')
            *nul = true;
        if (len + 1 < size)
            buf[len++] = (char)c;
        else
            *too_long = true;
    }
    buf[len] = '\0';
    return c != EOF || len > 0 || *nul || *too_long;
}

int cfg_parse_file(const char *path, cfg_cb cb, cfg_report report, void *ctx,
                   char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    static struct seen_keys seen;
    char line[CFG_LINE_MAX];
    int lineno = 0, problems = 0;
    bool too_long, nul;
    seen.n = 0;
    while (read_line(f, line, sizeof line, &too_long, &nul)) {
        lineno++;
        if (too_long || nul) {
            report_at(report, ctx, path, lineno,
                      too_long ? "line too long" : "NUL byte in line");
            problems++;
            continue;
        }
        char *s = str_trim(line);
        if (*s == '\0' || *s == '#')
            continue;
        if (!handle_line(s, path, lineno, cb, report, ctx, &seen))
            problems++;
    }
    if (ferror(f)) {
        snprintf(err, errlen, "%s: read error", path);
        fclose(f);
        return -1;
    }
    fclose(f);
    return problems;
}
