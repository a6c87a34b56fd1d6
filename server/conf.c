/* conf.c - odmrd.conf keys, defaults and validation (SPEC 3.1). */
#include "conf.h"

#include <ctype.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/un.h>

#include "../common/addr.h"
#include "../common/config.h"
#include "../common/util.h"

void conf_defaults(struct odmrd_conf *c)
{
    memset(c, 0, sizeof *c);
    system_fqdn(c->hostname, sizeof c->hostname);
    str_copy(c->spool_dir, "/var/spool/odmr", sizeof c->spool_dir);
    str_copy(c->accounts_db, "/var/lib/odmr/accounts.db", sizeof c->accounts_db);
    str_copy(c->sasl_mechanisms, "SCRAM-SHA-256 SCRAM-SHA-1 CRAM-MD5 PLAIN LOGIN",
             sizeof c->sasl_mechanisms);
    c->max_message_size = 52428800;
    c->max_recipients = 1000;
    c->queue_lifetime = 5 * 86400;
    c->max_connections = 500;
    c->max_connections_per_ip = 20;
    c->timeout = 300;
    c->auth_failure_limit = 10;
    c->auth_failure_window = 600;
    c->command_deadline = 60;
    c->data_min_rate = 500;
    c->milter_default_action = MILTER_FAIL_TEMPFAIL;
    c->milter_connect_timeout = 30;     /* Postfix's milter_connect_timeout */
    c->milter_command_timeout = 30;
    c->milter_content_timeout = 300;
    c->milter_protocol = 6;
    c->odmr_linger_max = 3600;
    c->odmr_linger_noop = 60;
    c->odmr_max_lingering = LINGER_DERIVE;   /* derive_budgets */
    static const struct listen_addr odmr[] = {{false, "0.0.0.0", "366"},
                                              {false, "::", "366"}};
    static const struct listen_addr smtp[] = {{false, "0.0.0.0", "25"},
                                              {false, "::", "25"}};
    memcpy(c->odmr_listen, odmr, sizeof odmr);
    c->n_odmr_listen = 2;
    memcpy(c->smtp_listen, smtp, sizeof smtp);
    c->n_smtp_listen = 2;
}

static bool valid_port(const char *p)
{
    unsigned long v;
    return parse_ulong(p, 65535, &v) && v > 0;
}

/* One "ADDR:PORT", "[V6]:PORT" or (when unix_ok) "unix:/path". */
static bool parse_one_listen(const char *w, bool unix_ok, struct listen_addr *a,
                             char *err, size_t n)
{
    memset(a, 0, sizeof *a);
    if (strncmp(w, "unix:", 5) == 0) {
        if (!unix_ok || w[5] != '/') {
            snprintf(err, n, "\"%s\": unix sockets need an absolute path "
                     "(LMTP only)", w);
            return false;
        }
        if (strlen(w + 5) >= sizeof ((struct sockaddr_un *)0)->sun_path) {
            snprintf(err, n, "\"%.40s...\": socket path longer than %zu bytes",
                     w, sizeof ((struct sockaddr_un *)0)->sun_path - 1);
            return false;
        }
        a->is_unix = true;
        return str_copy(a->host, w + 5, sizeof a->host);
    }
    const char *colon;
    if (w[0] == '[') {
        const char *close = strchr(w, ']');
        /* "[]" too: an empty host would read as "not set" (a bounce_relay
         * silently off) */
        if (!close || close == w + 1 || close[1] != ':' ||
            (size_t)(close - w - 1) >= sizeof a->host) {
            snprintf(err, n, "\"%s\": expected [IPV6]:PORT", w);
            return false;
        }
        memcpy(a->host, w + 1, (size_t)(close - w - 1));
        colon = close + 1;
    } else {
        colon = strrchr(w, ':');
        if (!colon || colon == w || (size_t)(colon - w) >= sizeof a->host) {
            snprintf(err, n, "\"%s\": expected ADDR:PORT", w);
            return false;
        }
        memcpy(a->host, w, (size_t)(colon - w));
    }
    if (!valid_port(colon + 1) || !str_copy(a->port, colon + 1, sizeof a->port)) {
        snprintf(err, n, "\"%s\": bad port", w);
        return false;
    }
    return true;
}

static bool parse_listen(const char *value, bool unix_ok,
                         struct listen_addr *list, size_t *count, char *err,
                         size_t n)
{
    char buf[CFG_LINE_MAX];
    str_copy(buf, value, sizeof buf);
    *count = 0;
    char *save = NULL;
    for (char *w = strtok_r(buf, " \t,", &save); w;
         w = strtok_r(NULL, " \t,", &save)) {
        if (*count == LISTEN_MAX) {
            snprintf(err, n, "at most %d addresses", LISTEN_MAX);
            return false;
        }
        if (!parse_one_listen(w, unix_ok, &list[*count], err, n))
            return false;
        (*count)++;
    }
    return true;
}

static bool parse_hostport(const char *value, char *host, size_t hn, char *port,
                           size_t pn, char *err, size_t n)
{
    struct listen_addr a;
    if (!*value) {
        host[0] = port[0] = '\0';
        return true;
    }
    if (!parse_one_listen(value, false, &a, err, n))
        return false;
    return str_copy(host, a.host, hn) && str_copy(port, a.port, pn);
}

static bool set_path(char *dst, size_t n, const char *value, char *err,
                     size_t en, bool may_be_empty)
{
    if (!*value && may_be_empty) {
        dst[0] = '\0';
        return true;
    }
    if (value[0] != '/') {
        snprintf(err, en, "\"%s\": must be an absolute path", value);
        return false;
    }
    if (!str_copy(dst, value, n)) {
        snprintf(err, en, "path too long");
        return false;
    }
    return true;
}

static bool valid_mechanisms(const char *v, char *err, size_t n)
{
    /* none at all would fail every AUTH, and so every ATRN */
    if (!v[strspn(v, " ")]) {
        snprintf(err, n, "no mechanism named (leave the key out for the "
                 "default)");
        return false;
    }
    for (const char *p = v; *p; p++) {
        if (!isupper((unsigned char)*p) && !isdigit((unsigned char)*p) &&
            !strchr("-_ ", *p)) {
            snprintf(err, n, "mechanism names are upper-case letters, digits, "
                     "'-' and '_', separated by spaces");
            return false;
        }
    }
    if (strstr(v, "ANONYMOUS")) {
        snprintf(err, n, "ANONYMOUS is never offered");
        return false;
    }
    return true;
}

static bool size_key(const char *v, uint64_t *out, char *err, size_t n)
{
    if (!parse_size(v, out)) {
        snprintf(err, n, "\"%s\": expected a size like 52428800, 50M or 1G", v);
        return false;
    }
    return true;
}

static bool duration_key(const char *v, long *out, char *err, size_t n)
{
    if (!parse_duration(v, out) || *out == 0) {
        snprintf(err, n, "\"%s\": expected a duration like 300s, 5m, 2h, 5d", v);
        return false;
    }
    return true;
}

static bool count_key(const char *v, unsigned long *out, char *err, size_t n)
{
    if (!parse_ulong(v, 1000000, out) || *out == 0) {
        snprintf(err, n, "\"%s\": expected a number from 1 to 1000000", v);
        return false;
    }
    return true;
}

/* "inet:HOST:PORT", "inet:[V6]:PORT" or "unix:/path" (Postfix's forms). */
static bool parse_one_milter(const char *w, struct milter_addr *m, char *err,
                             size_t n)
{
    struct listen_addr a;
    if (strncmp(w, "inet:", 5) == 0) {
        if (!parse_one_listen(w + 5, false, &a, err, n))
            return false;
    } else if (strncmp(w, "unix:", 5) == 0) {
        if (!parse_one_listen(w, true, &a, err, n))
            return false;
    } else {
        snprintf(err, n, "\"%.60s\": expected inet:HOST:PORT or unix:/path", w);
        return false;
    }
    memset(m, 0, sizeof *m);
    m->is_unix = a.is_unix;
    str_copy(m->host, a.host, sizeof m->host);
    str_copy(m->port, a.port, sizeof m->port);
    if (!str_copy(m->name, w, sizeof m->name)) {
        snprintf(err, n, "\"%.60s...\": too long", w);
        return false;
    }
    return true;
}

static bool parse_milters(struct odmrd_conf *c, const char *value, char *err,
                          size_t n)
{
    char buf[CFG_LINE_MAX];
    str_copy(buf, value, sizeof buf);
    c->n_milters = 0;
    char *save = NULL;
    for (char *w = strtok_r(buf, " \t,", &save); w;
         w = strtok_r(NULL, " \t,", &save)) {
        if (c->n_milters == MILTERS_MAX) {
            snprintf(err, n, "at most %d milters", MILTERS_MAX);
            return false;
        }
        if (!parse_one_milter(w, &c->milters[c->n_milters], err, n))
            return false;
        c->n_milters++;
    }
    return true;
}

static bool parse_milter_action(const char *v, enum milter_failure *out,
                                char *err, size_t n)
{
    if (!strcmp(v, "tempfail"))
        *out = MILTER_FAIL_TEMPFAIL;
    else if (!strcmp(v, "accept"))
        *out = MILTER_FAIL_ACCEPT;
    else if (!strcmp(v, "reject"))
        *out = MILTER_FAIL_REJECT;
    else {
        snprintf(err, n, "\"%s\": expected tempfail, accept or reject", v);
        return false;
    }
    return true;
}

/* Keys that are one number, one duration, one size or yes/no, by name:
 * adding such a key is one line here and one field in conf.h. */
enum key_kind {
    KEY_COUNT,       /* 1..1000000 */
    KEY_COUNT0,      /* 0..1000000, 0 meaning off */
    KEY_DURATION,
    KEY_DURATION0,   /* a duration or 0, meaning off */
    KEY_SIZE,
    KEY_BOOL,
};

struct simple_key {
    const char *name;
    enum key_kind kind;
    size_t offset;
};

#define FIELD(f) offsetof(struct odmrd_conf, f)
static const struct simple_key simple_keys[] = {
    {"require_tls", KEY_BOOL, FIELD(require_tls)},
    {"max_recipients", KEY_COUNT, FIELD(max_recipients)},
    {"domain_quota", KEY_SIZE, FIELD(domain_quota)},
    {"queue_lifetime", KEY_DURATION, FIELD(queue_lifetime)},
    {"max_connections", KEY_COUNT, FIELD(max_connections)},
    {"max_connections_per_ip", KEY_COUNT, FIELD(max_connections_per_ip)},
    {"smtp_max_connections", KEY_COUNT, FIELD(smtp_max_connections)},
    {"lmtp_max_connections", KEY_COUNT, FIELD(lmtp_max_connections)},
    {"odmr_max_connections", KEY_COUNT, FIELD(odmr_max_connections)},
    {"timeout", KEY_DURATION, FIELD(timeout)},
    {"command_deadline", KEY_DURATION, FIELD(command_deadline)},
    {"data_min_rate", KEY_COUNT0, FIELD(data_min_rate)},
    {"auth_failure_limit", KEY_COUNT, FIELD(auth_failure_limit)},
    {"auth_failure_window", KEY_DURATION, FIELD(auth_failure_window)},
    {"milter_connect_timeout", KEY_DURATION, FIELD(milter_connect_timeout)},
    {"milter_command_timeout", KEY_DURATION, FIELD(milter_command_timeout)},
    {"milter_content_timeout", KEY_DURATION, FIELD(milter_content_timeout)},
    {"odmr_linger_max", KEY_DURATION0, FIELD(odmr_linger_max)},
    {"odmr_linger_noop", KEY_DURATION, FIELD(odmr_linger_noop)},
    {"odmr_max_lingering", KEY_COUNT0, FIELD(odmr_max_lingering)},
};

static bool simple_value(struct odmrd_conf *c, const struct simple_key *k,
                         const char *v, char *err, size_t n)
{
    void *field = (char *)c + k->offset;
    switch (k->kind) {
    case KEY_COUNT:
        return count_key(v, field, err, n);
    case KEY_COUNT0:
        if (parse_ulong(v, 1000000, field))
            return true;
        snprintf(err, n, "\"%s\": expected a number from 0 to 1000000", v);
        return false;
    case KEY_DURATION:
        return duration_key(v, field, err, n);
    case KEY_DURATION0:
        if (parse_duration(v, field))
            return true;
        snprintf(err, n, "\"%s\": expected 0 or a duration like 300s, 5m, 2h", v);
        return false;
    case KEY_SIZE:
        return size_key(v, field, err, n);
    case KEY_BOOL:
        if (parse_bool(v, field))
            return true;
        snprintf(err, n, "\"%s\": expected yes or no", v);
        return false;
    }
    return false;
}

/* 1 when k is a simple key (then *ok tells whether v was good), else 0. */
static int simple_key(struct odmrd_conf *c, const char *k, const char *v,
                      bool *ok, char *err, size_t n)
{
    for (size_t i = 0; i < sizeof simple_keys / sizeof simple_keys[0]; i++) {
        if (!strcmp(k, simple_keys[i].name)) {
            *ok = simple_value(c, &simple_keys[i], v, err, n);
            return 1;
        }
    }
    return 0;
}

static int milter_key(struct odmrd_conf *c, const char *k, const char *v,
                      char *err, size_t n);

static int conf_key(void *ctx, const char *k, const char *v, char *err, size_t n)
{
    struct odmrd_conf *c = ctx;
    bool ok;
    if (simple_key(c, k, v, &ok, err, n))
        ;
    else if (!strcmp(k, "hostname")) {
        ok = addr_valid_domain(v, false) && str_copy(c->hostname, v, sizeof c->hostname);
        if (!ok)
            snprintf(err, n, "\"%s\": not a valid host name", v);
    } else if (!strcmp(k, "odmr_listen"))
        ok = parse_listen(v, false, c->odmr_listen, &c->n_odmr_listen, err, n);
    else if (!strcmp(k, "smtp_listen"))
        ok = parse_listen(v, false, c->smtp_listen, &c->n_smtp_listen, err, n);
    else if (!strcmp(k, "lmtp_listen"))
        ok = parse_listen(v, true, c->lmtp_listen, &c->n_lmtp_listen, err, n);
    else if (!strcmp(k, "spool_dir"))
        ok = set_path(c->spool_dir, sizeof c->spool_dir, v, err, n, false);
    else if (!strcmp(k, "accounts_db"))
        ok = set_path(c->accounts_db, sizeof c->accounts_db, v, err, n, false);
    else if (!strcmp(k, "tls_cert_file"))
        ok = set_path(c->tls_cert_file, sizeof c->tls_cert_file, v, err, n, true);
    else if (!strcmp(k, "tls_key_file"))
        ok = set_path(c->tls_key_file, sizeof c->tls_key_file, v, err, n, true);
    else if (!strcmp(k, "sasl_mechanisms"))
        ok = valid_mechanisms(v, err, n) &&
             str_copy(c->sasl_mechanisms, v, sizeof c->sasl_mechanisms);
    else if (!strcmp(k, "max_message_size")) {
        /* 0 would advertise "SIZE 0" (no limit, RFC 1870) yet refuse all */
        ok = size_key(v, &c->max_message_size, err, n) && c->max_message_size > 0;
        if (ok == false && !err[0])
            snprintf(err, n, "must be more than 0");
    }
    else if (!strcmp(k, "bounce_relay"))
        ok = parse_hostport(v, c->bounce_relay_host, sizeof c->bounce_relay_host,
                            c->bounce_relay_port, sizeof c->bounce_relay_port,
                            err, n);
    else if (!strcmp(k, "user"))
        ok = str_copy(c->user, v, sizeof c->user);
    else if (!strcmp(k, "pid_file"))
        ok = set_path(c->pid_file, sizeof c->pid_file, v, err, n, true);
    else
        return milter_key(c, k, v, err, n);
    return ok ? 0 : -1;
}

/* The milter keys that are not simple keys; -1 for an unknown key. */
static int milter_key(struct odmrd_conf *c, const char *k, const char *v,
                      char *err, size_t n)
{
    bool ok;
    if (!strcmp(k, "milters"))
        ok = parse_milters(c, v, err, n);
    else if (!strcmp(k, "milter_default_action"))
        ok = parse_milter_action(v, &c->milter_default_action, err, n);
    else if (!strcmp(k, "milter_protocol")) {
        ok = parse_ulong(v, 6, &c->milter_protocol) && c->milter_protocol >= 2;
        if (!ok)
            snprintf(err, n, "\"%s\": expected a protocol version from 2 to 6", v);
    }
    else {
        snprintf(err, n, "unknown key");
        return -1;
    }
    return ok ? 0 : -1;
}

struct report_ctx {
    void (*report)(void *ctx, const char *msg);
    void *ctx;
    struct odmrd_conf *conf;
};

static void forward_report(void *ctx, const char *msg)
{
    struct report_ctx *r = ctx;
    r->report(r->ctx, msg);
}

static int forward_key(void *ctx, const char *k, const char *v, char *err,
                       size_t n)
{
    struct report_ctx *r = ctx;
    return conf_key(r->conf, k, v, err, n);
}

/* Per-service budgets not given are shares of max_connections (60% SMTP,
 * 20% LMTP, the rest ODMR), so that by default they add up to the total
 * and a flood of one service cannot take the others' room. */
static void derive_budgets(struct odmrd_conf *c)
{
    unsigned long total = c->max_connections;
    if (!c->smtp_max_connections)
        c->smtp_max_connections = total * 6 / 10 ? total * 6 / 10 : 1;
    if (!c->lmtp_max_connections)
        c->lmtp_max_connections = total * 2 / 10 ? total * 2 / 10 : 1;
    if (!c->odmr_max_connections) {
        unsigned long used = c->smtp_max_connections + c->lmtp_max_connections;
        c->odmr_max_connections = total > used ? total - used : 1;
    }
    /* Lingering sessions hold their connection for up to odmr_linger_max:
     * by default they may take half of the ODMR budget, so polling
     * customers always find room. */
    if (c->odmr_max_lingering == LINGER_DERIVE)
        c->odmr_max_lingering = c->odmr_max_connections / 2;
}

/* The kernel's limit on inotify instances per user, 0 if unknown. */
static unsigned long inotify_instances(void)
{
    unsigned long v = 0;
    FILE *f = fopen("/proc/sys/fs/inotify/max_user_instances", "re");
    if (f) {
        if (fscanf(f, "%lu", &v) != 1)
            v = 0;
        fclose(f);
    }
    return v;
}

/* Checks that need the whole file: keys that only make sense together. */
static int conf_check(struct odmrd_conf *c,
                      void (*report)(void *ctx, const char *msg), void *ctx)
{
    char msg[PATH_MAX + 256];
    int problems = 0;
    derive_budgets(c);
    if (c->smtp_max_connections + c->lmtp_max_connections +
        c->odmr_max_connections > c->max_connections) {
        /* allowed (a busy service may borrow), but then no longer a
         * guarantee: say so, without refusing the file */
        snprintf(msg, sizeof msg, "%s: warning: smtp_, lmtp_ and "
                 "odmr_max_connections add up to more than max_connections "
                 "(%lu): a flood of one service can refuse another", c->path,
                 c->max_connections);
        report(ctx, msg);
    }
    unsigned long instances = inotify_instances();
    if (c->odmr_linger_max > 0 && instances &&
        c->odmr_max_lingering >= instances) {
        /* each lingering session needs one, and all run as one user */
        snprintf(msg, sizeof msg, "%s: warning: odmr_max_lingering (%lu) is "
                 "not below the kernel's fs.inotify.max_user_instances "
                 "(%lu): customers beyond it get 451 at XLINGER and poll",
                 c->path, c->odmr_max_lingering, instances);
        report(ctx, msg);
    }
    if (c->odmr_linger_noop >= 300) {
        /* RFC 5321 4.5.3.2: a server may give up on a client silent for
         * 5 minutes; the keepalive must come before that */
        snprintf(msg, sizeof msg, "%s: odmr_linger_noop must be under 5m "
                 "(customers may close a connection idle for 5 minutes)",
                 c->path);
        report(ctx, msg);
        problems++;
    }
    if (!!c->tls_cert_file[0] != !!c->tls_key_file[0]) {
        snprintf(msg, sizeof msg, "%s: tls_cert_file and tls_key_file go "
                 "together", c->path);
        report(ctx, msg);
        problems++;
    }
    if (c->require_tls && !c->tls_cert_file[0]) {
        snprintf(msg, sizeof msg, "%s: require_tls = yes needs tls_cert_file "
                 "and tls_key_file", c->path);
        report(ctx, msg);
        problems++;
    }
    if (c->n_odmr_listen + c->n_smtp_listen + c->n_lmtp_listen == 0) {
        snprintf(msg, sizeof msg, "%s: no listeners configured", c->path);
        report(ctx, msg);
        problems++;
    }
    return problems;
}

int conf_load(struct odmrd_conf *c, const char *path,
              void (*report)(void *ctx, const char *msg), void *ctx)
{
    conf_defaults(c);
    str_copy(c->path, path, sizeof c->path);
    struct report_ctx r = {report, ctx, c};
    char err[PATH_MAX + 128];
    int problems = cfg_parse_file(path, forward_key, forward_report, &r, err,
                                  sizeof err);
    if (problems < 0) {
        report(ctx, err);
        return 1;
    }
    return problems + conf_check(c, report, ctx);
}
