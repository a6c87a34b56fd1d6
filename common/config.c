/* config.c - the shared "key = value" file reader. */
#include "config.h"

#include <errno.h>
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

/* Handles one non-comment line; returns false after reporting a problem. */
static bool handle_line(char *line, const char *path, int lineno, cfg_cb cb,
                        cfg_report report, void *ctx)
{
    char *eq = strchr(line, '=');
    if (!eq) {
        report_at(report, ctx, path, lineno, "expected \"key = value\"");
        return false;
    }
    *eq = '\0';
    char *key = str_trim(line);
    char *value = str_trim(eq + 1);
    if (!*key) {
        report_at(report, ctx, path, lineno, "missing key before '='");
        return false;
    }
    char err[512] = "";
    if (cb(ctx, key, value, err, sizeof err) != 0) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s: %s", key, err[0] ? err : "bad value");
        report_at(report, ctx, path, lineno, msg);
        return false;
    }
    return true;
}

int cfg_parse_file(const char *path, cfg_cb cb, cfg_report report, void *ctx,
                   char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    char line[CFG_LINE_MAX];
    int lineno = 0, problems = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        size_t len = strlen(line);
        if (len == sizeof line - 1 && line[len - 1] != '\n') {
            report_at(report, ctx, path, lineno, "line too long");
            problems++;
            int c;
            while ((c = fgetc(f)) != EOF && c != '\n')
                ;
            continue;
        }
        char *s = str_trim(line);
        if (*s == '\0' || *s == '#')
            continue;
        if (!handle_line(s, path, lineno, cb, report, ctx))
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
