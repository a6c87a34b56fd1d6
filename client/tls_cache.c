/* tls_cache.c - the TLS session kept between odmr-fetch runs.
 *
 * Guarantee: a saved session is offered only to the server name and port
 * it was made with, and only while everything its certificate check
 * depended on is unchanged (server name, port, --tls mode, the CA file's
 * path, inode, size and mtime, or the system trust store's); anything
 * else, and any file that does not parse, is deleted and costs one full
 * handshake, never a failed run.  The file sits next to the run lock,
 * mode 0600, owned by us, replaced atomically (temporary file + rename);
 * the run lock serialises writers.  It is a cache: not fsynced, since a
 * torn file after a crash is just one more full handshake.
 *
 * Every renewed ticket restarts OpenSSL's session time, so a site that
 * polls daily would resume for ever on one certificate check; the file
 * keeps the time of the full handshake behind its session, and a session
 * whose chain of resumptions began more than TLS_CACHE_FULL_MAX ago (RFC
 * 8446 4.6.1's seven days), or whose server certificate has expired
 * since, is discarded.
 *
 * Format (text):
 *   odmr-fetch TLS session 2
 *   verify <SHA-256 hex of the verification settings>
 *   full <Unix time of the full handshake>
 *   -----BEGIN SSL SESSION PARAMETERS----- ... (PEM_write_SSL_SESSION)
 * A file of format 1 (no "full" line) is discarded quietly.
 */
#include "fetch.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#define CACHE_MAGIC "odmr-fetch TLS session 2\n"
#define CACHE_MAGIC_V1 "odmr-fetch TLS session 1\n"
#define CACHE_VERIFY "verify "
#define CACHE_FULL "full "
#define TLS_CACHE_FULL_MAX (7 * 86400)
#define CACHE_FILE_MAX 65536

/* ---- where, and what verification depended on ------------------------ */

/* <lock file without ".lock">.tls-<server>-<port>: private wherever the
 * lock is, and one file per provider. */
static bool cache_path(const struct fetch_conf *c, char *buf, size_t n)
{
    char host[FETCH_HOST_MAX];
    size_t len = strlen(c->lock_file);

    if (len >= 5 && !strcmp(c->lock_file + len - 5, ".lock"))
        len -= 5;
    size_t i = 0;
    for (; c->server[i] && i + 1 < sizeof host; i++) {
        char ch = c->server[i];
        bool plain = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                     (ch >= '0' && ch <= '9') || ch == '.' || ch == '-';
        host[i] = plain ? ch : '_';
    }
    host[i] = '\0';
    return str_fmt(buf, n, "%.*s.tls-%s-%u", (int)len, c->lock_file, host,
                   c->port);
}

/* "path:dev:ino:size:mtime" of a trust file (or "path:absent"). */
static void describe_file(const char *path, char *buf, size_t n)
{
    struct stat st;

    if (!path || stat(path, &st) != 0) {
        snprintf(buf, n, "%s:absent", path ? path : "");
        return;
    }
    snprintf(buf, n, "%s:%lu:%lu:%lld:%lld.%09ld", path,
             (unsigned long)st.st_dev, (unsigned long)st.st_ino,
             (long long)st.st_size, (long long)st.st_mtim.tv_sec,
             st.st_mtim.tv_nsec);
}

/* describe_file for each directory of a colon-separated list, as OpenSSL
 * reads SSL_CERT_DIR. */
static void describe_dirs(const char *list, char *buf, size_t n)
{
    char one[PATH_MAX + 64];
    size_t used = 0;

    buf[0] = '\0';
    while (list && used + 1 < n) {
        const char *colon = strchr(list, ':');
        size_t len = colon ? (size_t)(colon - list) : strlen(list);
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%.*s", (int)len, list);
        describe_file(dir, one, sizeof one);
        int w = snprintf(buf + used, n - used, "%s%s", used ? ";" : "", one);
        if (w < 0)
            break;
        used += (size_t)w;
        list = colon ? colon + 1 : NULL;
    }
}

/* OpenSSL takes the system store from SSL_CERT_FILE and SSL_CERT_DIR
 * when they are set: a narrower store there must discard the session. */
static const char *env_or(const char *name, const char *fallback)
{
    const char *v = getenv(name);
    return v && *v ? v : fallback;
}

static bool settings_hash(const struct fetch_conf *c, char hex[65])
{
    char text[3 * PATH_MAX + FETCH_HOST_MAX + 128], a[PATH_MAX + 64],
        b[PATH_MAX + 64];
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;

    if (c->ca_file[0]) {
        describe_file(c->ca_file, a, sizeof a);
        snprintf(b, sizeof b, "-");
    } else {   /* the system store, as SSL_CTX_set_default_verify_paths */
        describe_file(env_or(X509_get_default_cert_file_env(),
                             X509_get_default_cert_file()), a, sizeof a);
        describe_dirs(env_or(X509_get_default_cert_dir_env(),
                             X509_get_default_cert_dir()), b, sizeof b);
    }
    /* v1: peer verification with the host name check, partial chains
     * when a CA file is given (common/io.c tls_client_ctx). */
    int len = snprintf(text, sizeof text, "v1\nserver=%s\nport=%u\ntls=%d\n"
                       "ca=%s\nstore=%s\n", c->server, c->port, (int)c->tls,
                       a, b);
    if (len < 0 || (size_t)len >= sizeof text ||
        EVP_Digest(text, (size_t)len, md, &mdlen, EVP_sha256(), NULL) != 1 ||
        mdlen != 32)
        return false;
    for (unsigned i = 0; i < mdlen; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    return true;
}

bool tls_cache_init(struct tls_cache *tc, const struct fetch_conf *c)
{
    memset(tc, 0, sizeof *tc);
    tc->verbose = c->verbose;
    if (!cache_path(c, tc->path, sizeof tc->path) ||
        !settings_hash(c, tc->settings)) {
        fprintf(stderr, "odmr-fetch: cannot keep the TLS session (lock file "
                        "name too long?); every run does a full handshake\n");
        return false;
    }
    tc->ready = true;
    return true;
}

void tls_cache_discard(struct tls_cache *tc)
{
    if (tc->ready && unlink(tc->path) != 0 && errno != ENOENT)
        fprintf(stderr, "odmr-fetch: cannot remove TLS session file %s: %s\n",
                tc->path, strerror(errno));
}

/* ---- loading ---------------------------------------------------------- */

/* The file into buf (NUL-terminated): 1 read, 0 absent, -1 unusable with
 * the reason in why. */
static int read_cache_file(const char *path, char *buf, size_t n,
                           char *why, size_t wn)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0) {
        if (errno == ENOENT)
            return 0;
        snprintf(why, wn, "%s", strerror(errno));
        return -1;
    }
    struct stat st;
    size_t len = 0;
    ssize_t r = 0;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) ||
        st.st_uid != geteuid() || (st.st_mode & 077)) {
        snprintf(why, wn, "not a private regular file of ours");
        close(fd);
        return -1;
    }
    while (len + 1 < n && (r = read(fd, buf + len, n - 1 - len)) > 0)
        len += (size_t)r;
    close(fd);
    buf[len] = '\0';
    if (r < 0 || len + 1 >= n || strlen(buf) != len) {
        snprintf(why, wn, r < 0 ? "read error" : "too large or binary");
        return -1;
    }
    return 1;
}

/* The session in text; NULL with why set (corrupt) or *stale set to why
 * a sound file is of no use (other verification settings, older format). */
static SSL_SESSION *parse_cache(const struct tls_cache *tc, const char *text,
                                const char **stale, long long *full_at,
                                const char **why)
{
    size_t ml = strlen(CACHE_MAGIC), vl = strlen(CACHE_VERIFY);
    const char *p = text + ml;

    if (!strncmp(text, CACHE_MAGIC_V1, strlen(CACHE_MAGIC_V1))) {
        *stale = "was saved by an older odmr-fetch (without the time of its "
                 "full handshake)";
        return NULL;
    }
    if (strncmp(text, CACHE_MAGIC, ml) != 0 ||
        strncmp(p, CACHE_VERIFY, vl) != 0 || strlen(p) < vl + 65 ||
        p[vl + 64] != '\n') {
        *why = "not a saved TLS session";
        return NULL;
    }
    if (memcmp(p + vl, tc->settings, 64) != 0) {
        *stale = "was made under other verification settings";
        return NULL;
    }
    p += vl + 65;
    char *end;
    if (strncmp(p, CACHE_FULL, strlen(CACHE_FULL)) != 0 ||
        (*full_at = strtoll(p + strlen(CACHE_FULL), &end, 10)) <= 0 ||
        *end != '\n') {
        *why = "no time of the full handshake";
        return NULL;
    }
    BIO *bio = BIO_new_mem_buf(end + 1, -1);
    SSL_SESSION *s = bio ? PEM_read_bio_SSL_SESSION(bio, NULL, NULL, NULL)
                         : NULL;
    BIO_free(bio);
    ERR_clear_error();
    if (!s)
        *why = "the session data does not parse";
    return s;
}

/* Whether s can be offered now: made by a verified handshake (it names a
 * peer certificate that has not expired since), not past its lifetime,
 * and resting on a full handshake less than TLS_CACHE_FULL_MAX ago. */
static bool still_usable(SSL_SESSION *s, long long full_at)
{
    long made = (long)SSL_SESSION_get_time(s);
    long life = (long)SSL_SESSION_get_timeout(s);
    long long now = (long long)time(NULL);
    X509 *peer = SSL_SESSION_get0_peer(s);

    return SSL_SESSION_is_resumable(s) && peer &&
           X509_cmp_current_time(X509_get0_notAfter(peer)) > 0 &&
           made + life > (long)now && full_at <= now &&
           now - full_at < TLS_CACHE_FULL_MAX;
}

SSL_SESSION *tls_cache_load(struct tls_cache *tc)
{
    static char text[CACHE_FILE_MAX];
    char why[128];
    const char *bad = NULL, *stale = NULL;

    if (!tc->ready)
        return NULL;
    int r = read_cache_file(tc->path, text, sizeof text, why, sizeof why);
    if (r == 0)
        return NULL;
    long long full_at = 0;
    SSL_SESSION *s = r > 0 ? parse_cache(tc, text, &stale, &full_at, &bad)
                           : NULL;
    if (r < 0)
        bad = why;
    if (s && still_usable(s, full_at)) {
        tc->full_at = full_at;
        return s;
    }
    if (bad)
        fprintf(stderr, "odmr-fetch: ignoring TLS session file %s: %s; "
                        "doing a full handshake\n", tc->path, bad);
    else if (tc->verbose)
        fprintf(stderr, "odmr-fetch: saved TLS session %s; discarding it\n",
                stale ? stale
                      : "has expired (or its full handshake is a week old)");
    SSL_SESSION_free(s);
    tls_cache_discard(tc);
    return NULL;
}

/* ---- saving ----------------------------------------------------------- */

static bool write_atomically(const char *path, const char *data, size_t len)
{
    char tmp[PATH_MAX + 16];

    if (!str_fmt(tmp, sizeof tmp, "%s.XXXXXX", path)) {
        errno = ENAMETOOLONG;
        return false;
    }
    int fd = mkstemp(tmp);   /* O_EXCL, mode 0600 */
    if (fd < 0)
        return false;
    bool ok = fchmod(fd, 0600) == 0 && write_all(fd, data, len);
    ok = close(fd) == 0 && ok;
    if (ok && rename(tmp, path) == 0)
        return true;
    int e = errno;
    unlink(tmp);
    errno = e;
    return false;
}

static void save_session(const struct tls_cache *tc, SSL_SESSION *sess,
                         long long full_at)
{
    BIO *mem = BIO_new(BIO_s_mem());
    char *data = NULL;
    bool ok = mem && BIO_puts(mem, CACHE_MAGIC) > 0 &&
              BIO_printf(mem, "%s%s\n", CACHE_VERIFY, tc->settings) > 0 &&
              BIO_printf(mem, "%s%lld\n", CACHE_FULL, full_at) > 0 &&
              PEM_write_bio_SSL_SESSION(mem, sess) == 1;
    long len = ok ? BIO_get_mem_data(mem, &data) : 0;

    ERR_clear_error();
    errno = 0;
    if (!ok || len <= 0 || !write_atomically(tc->path, data, (size_t)len))
        fprintf(stderr, "odmr-fetch: cannot save TLS session to %s: %s\n",
                tc->path, errno ? strerror(errno) : "cannot encode it");
    BIO_free(mem);
}

/* TLS 1.3 sends tickets after the handshake, so sessions are collected
 * here, whenever OpenSSL has one, rather than after SSL_connect. */
static int new_session(SSL *ssl, SSL_SESSION *sess)
{
    struct tls_cache *tc = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));

    if (tc && tc->ready && SSL_get_verify_result(ssl) == X509_V_OK &&
        SSL_get0_peer_certificate(ssl) && SSL_SESSION_is_resumable(sess)) {
        /* a resumed session's tickets rest on the same full handshake */
        if (!SSL_session_reused(ssl) || tc->full_at <= 0)
            tc->full_at = (long long)time(NULL);
        save_session(tc, sess, tc->full_at);
    }
    return 0;   /* not kept: OpenSSL frees it */
}

void tls_cache_attach(struct tls_cache *tc, SSL_CTX *ctx)
{
    if (!tc->ready)
        return;
    SSL_CTX_set_app_data(ctx, tc);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT |
                                            SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, new_session);
}
