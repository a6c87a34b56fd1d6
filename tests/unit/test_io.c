/* test_io.c - common/io.c over socketpairs with a forked peer.
 *
 * The peer (child) runs a fixed script and reports through its exit code:
 * 0 = everything it saw was as expected, anything else names the step that
 * went wrong.  The TLS cases use a self-signed certificate generated here at
 * run time, so the test needs no fixtures and no network. */
#include "../../common/io.h"
#include "check.h"

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

#define CERT_NAME "mail.example.test"

/* ---- plumbing ---------------------------------------------------------- */

typedef int (*child_fn)(int fd, void *arg);

/* socketpair + fork: the child runs fn on its end and exits with its
 * result; the parent gets the other end. */
static pid_t spawn(int *parent_fd, child_fn fn, void *arg)
{
    int sv[2];

    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
        perror("socketpair");
        exit(1);
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(1);
    }
    if (pid == 0) {
        close(sv[0]);
        alarm(20);   /* a deadlocked peer must not hang the test suite */
        _exit(fn(sv[1], arg));
    }
    close(sv[1]);
    *parent_fd = sv[0];
    return pid;
}

static int reap(pid_t pid)
{
    int st = 0;

    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    if (WIFEXITED(st))
        return WEXITSTATUS(st);
    return 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
}

static bool put_raw(int fd, const void *data, size_t len)
{
    const char *p = data;

    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return false;
        p += n;
        len -= (size_t)n;
    }
    return true;
}

/* Blocks until the parent closes its end. */
static void drain_to_eof(int fd)
{
    char b[4096];

    for (;;) {
        ssize_t n = read(fd, b, sizeof b);
        if (n == 0 || (n < 0 && errno != EINTR))
            return;
    }
}

static int64_t ms_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- getline ----------------------------------------------------------- */

static const char part1[] =
    "HELO a\r\n"
    "bare\n"
    "\r\n"
    "a\0b\r\n"
    "x\ry\r\n"
    "123456789012345\r\n"    /* exactly max-1 = 15: fits */
    "123456789012345\n"
    "1234567890123456\r\n"   /* 16: too long */
    "split\r";

static int lines_child(int fd, void *arg)
{
    char *big = malloc(40002);

    (void)arg;
    if (!big)
        return 2;
    if (!put_raw(fd, part1, sizeof part1 - 1))
        return 3;
    usleep(100 * 1000);   /* the LF of "split\r\n" arrives in another read */
    memset(big, 'L', 40000);
    memcpy(big + 40000, "\r\n", 2);
    if (!put_raw(fd, "\n", 1) || !put_raw(fd, big, 40002) ||
        !put_raw(fd, "after\r\npartial", 14))
        return 4;
    free(big);
    return 0;
}

static void test_getline(void)
{
    int fd;
    pid_t pid = spawn(&fd, lines_child, NULL);
    struct io io;
    char buf[16];
    bool bare = true;

    io_init(&io, fd, 5000);
    CHECK(io.status == IO_OK);
    CHECK(io_getline(&io, buf, sizeof buf, &bare) == 6);
    CHECK_STR(buf, "HELO a");
    CHECK(!bare);
    CHECK(io_getline(&io, buf, sizeof buf, &bare) == 4);
    CHECK_STR(buf, "bare");
    CHECK(bare);
    CHECK(io_getline(&io, buf, sizeof buf, &bare) == 0);
    CHECK_STR(buf, "");
    CHECK(!bare);
    /* NUL kept: the length tells, strlen does not */
    CHECK(io_getline(&io, buf, sizeof buf, NULL) == 3);
    CHECK(memcmp(buf, "a\0b", 4) == 0);
    CHECK(io_getline(&io, buf, sizeof buf, &bare) == 3);
    CHECK_STR(buf, "x\ry");
    CHECK(io_getline(&io, buf, sizeof buf, &bare) == 15);
    CHECK_STR(buf, "123456789012345");
    CHECK(!bare);
    CHECK(io_getline(&io, buf, sizeof buf, &bare) == 15);
    CHECK(bare);
    CHECK(io_getline(&io, buf, sizeof buf, &bare) == IO_TOOLONG);
    CHECK(io.status == IO_TOOLONG);
    CHECK_STR(buf, "123456789012345");   /* truncated head, for logging */
    CHECK(io_getline(&io, buf, sizeof buf, &bare) == 5);
    CHECK_STR(buf, "split");
    CHECK(!bare);
    /* 40000 bytes span several buffer refills */
    CHECK(io_getline(&io, buf, sizeof buf, &bare) == IO_TOOLONG);
    CHECK(io_getline(&io, buf, sizeof buf, &bare) == 5);
    CHECK_STR(buf, "after");
    CHECK(io_getline(&io, buf, sizeof buf, &bare) == IO_EOF);
    CHECK(io.status == IO_EOF);
    CHECK(io_getline(&io, buf, sizeof buf, &bare) == IO_EOF);
    CHECK(io.bytes_in == sizeof part1 - 1 + 1 + 40002 + 14);
    io_close(&io);
    CHECK(reap(pid) == 0);
}

/* ---- timeouts ---------------------------------------------------------- */

static int silent_child(int fd, void *arg)
{
    (void)arg;
    drain_to_eof(fd);
    return 0;
}

static int stalled_child(int fd, void *arg)
{
    (void)fd;
    (void)arg;
    pause();   /* never reads; the parent kills us */
    return 0;
}

static void on_alarm(int sig)
{
    (void)sig;
}

static void set_ticker(int interval_ms)
{
    struct itimerval it = { { 0, interval_ms * 1000 },
                            { 0, interval_ms * 1000 } };
    setitimer(ITIMER_REAL, &it, NULL);
}

static void test_read_timeout(void)
{
    int fd;
    pid_t pid = spawn(&fd, silent_child, NULL);
    struct io io;
    char buf[64];

    /* Signals every 20 ms interrupt poll(); the timeout must still be the
     * configured 300 ms, neither reset by each EINTR nor cut short. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;   /* no SA_RESTART: poll sees EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    set_ticker(20);

    io_init(&io, fd, 300);
    int64_t t0 = ms_now();
    CHECK(io_getline(&io, buf, sizeof buf, NULL) == IO_TIMEOUT);
    int64_t dt = ms_now() - t0;
    set_ticker(0);
    CHECK(io.status == IO_TIMEOUT);
    CHECK(dt >= 290 && dt < 2000);
    /* the connection is still usable after a read timeout (421 reply) */
    CHECK(io_puts(&io, "421 timeout\r\n") && io_flush(&io));
    io_close(&io);
    CHECK(reap(pid) == 0);
}

static void test_write_timeout(void)
{
    int fd;
    pid_t pid = spawn(&fd, stalled_child, NULL);
    struct io io;
    static char chunk[65536];
    bool ok = true;

    memset(chunk, 'w', sizeof chunk);
    io_init(&io, fd, 200);
    for (int i = 0; i < 256 && ok; i++)   /* 16 MB > any socket buffer */
        ok = io_write(&io, chunk, sizeof chunk);
    if (ok)
        ok = io_flush(&io);
    CHECK(!ok);
    CHECK(io.status == IO_TIMEOUT);
    CHECK(io.bytes_out > 0 && io.bytes_out < 256ULL * sizeof chunk);
    /* after a failed flush later writes fail at once, without waiting */
    int64_t t0 = ms_now();
    CHECK(!(io_puts(&io, "x\r\n") && io_flush(&io)));
    CHECK(io.status == IO_ERROR);
    CHECK(ms_now() - t0 < 150);
    io_close(&io);
    kill(pid, SIGKILL);
    CHECK(reap(pid) == 128 + SIGKILL);
}

struct trace_count {
    int in, out;
    size_t out_bytes;
};

static void count_trace(void *ctx, bool out, const char *data, size_t len)
{
    struct trace_count *t = ctx;

    (void)data;
    if (out) {
        t->out++;
        t->out_bytes += len;
    } else {
        t->in++;
    }
}

/* ---- deadlines --------------------------------------------------------- */

/* Writes s one byte every step_ms (a trickling peer). */
static bool trickle(int fd, const char *s, int step_ms)
{
    for (; *s; s++) {
        if (!put_raw(fd, s, 1))
            return false;
        usleep((useconds_t)step_ms * 1000);
    }
    return true;
}

/* An idle pause longer than the line deadline, a line that arrives in
 * pieces within it, a line trickled past it, and a line stalled halfway. */
static int deadline_child(int fd, void *arg)
{
    (void)arg;
    usleep(600 * 1000);
    if (!trickle(fd, "NOOP\r\n", 20))
        return 2;
    if (!trickle(fd, "HELO slow.example\r\n", 100))
        return 3;
    if (!put_raw(fd, "HE", 2))
        return 4;
    drain_to_eof(fd);
    return 0;
}

static void test_line_deadline(void)
{
    int fd;
    pid_t pid = spawn(&fd, deadline_child, NULL);
    struct io io;
    char buf[64];

    io_init(&io, fd, 1000);
    io_set_line_deadline(&io, 400);
    /* the idle wait before a line is the timeout's, not the deadline's */
    int64_t t0 = ms_now();
    CHECK(io_getline(&io, buf, sizeof buf, NULL) == 4);
    CHECK_STR(buf, "NOOP");
    CHECK(ms_now() - t0 >= 550);
    /* 19 bytes at 100 ms each cannot make it in 400 ms */
    t0 = ms_now();
    CHECK(io_getline(&io, buf, sizeof buf, NULL) == IO_DEADLINE);
    int64_t dt = ms_now() - t0;
    CHECK(io.status == IO_DEADLINE);
    CHECK(dt >= 380 && dt < 900);
    CHECK_STR(buf, "");
    /* a reply still goes out after a deadline (421) */
    CHECK(io_puts(&io, "421 deadline\r\n") && io_flush(&io));
    /* skip the rest of the slow line; then "HE" stalls: the timeout comes
     * first when it is shorter than the line deadline */
    io_set_line_deadline(&io, 0);
    CHECK(io_getline(&io, buf, sizeof buf, NULL) > 0);
    io.timeout_ms = 300;
    io_set_line_deadline(&io, 5000);
    CHECK(io_getline(&io, buf, sizeof buf, NULL) == IO_TIMEOUT);
    io_close(&io);
    CHECK(reap(pid) == 0);
}

static int slow_data_child(int fd, void *arg)
{
    (void)arg;
    return trickle(fd, "one byte every 50 ms, far too slowly\r\n", 50) ? 0 : 2;
}

static void test_phase_deadline(void)
{
    int fd;
    pid_t pid = spawn(&fd, slow_data_child, NULL);
    struct io io;
    char seg[64];
    long n = 0;

    io_init(&io, fd, 2000);
    int64_t t0 = ms_now();
    io_set_deadline(&io, io_clock_ms() + 300);
    while (n >= 0)   /* every byte is progress: only the deadline ends it */
        n = io_getseg(&io, seg, sizeof seg, NULL);
    int64_t dt = ms_now() - t0;
    CHECK(n == IO_DEADLINE && io.status == IO_DEADLINE);
    CHECK(dt >= 280 && dt < 900);
    CHECK(io.bytes_in >= 3 && io.bytes_in <= 12);
    /* once removed, reads wait for the timeout again */
    io_set_deadline(&io, 0);
    CHECK(io_getseg(&io, seg, sizeof seg, NULL) > 0);
    io_close(&io);
    kill(pid, SIGKILL);
    reap(pid);

    /* writes respect it too: a peer that does not read */
    static char chunk[65536];
    bool ok = true;
    pid = spawn(&fd, stalled_child, NULL);
    io_init(&io, fd, 5000);
    io_set_deadline(&io, io_clock_ms() + 200);
    t0 = ms_now();
    for (int i = 0; i < 256 && ok; i++)
        ok = io_write(&io, chunk, sizeof chunk);
    CHECK(!ok || !io_flush(&io));
    CHECK(io.status == IO_DEADLINE);
    CHECK(ms_now() - t0 < 2000);
    io_close(&io);
    kill(pid, SIGKILL);
    CHECK(reap(pid) == 128 + SIGKILL);
}

/* A long line sent at once, then the rest of a session. */
static int flood_child(int fd, void *arg)
{
    (void)arg;
    static char line[40000];
    memset(line, 'A', sizeof line - 2);
    memcpy(line + sizeof line - 2, "\r\n", 2);
    if (!put_raw(fd, line, sizeof line))
        return 2;
    drain_to_eof(fd);
    return 0;
}

/* A deadline that has passed holds even when every read finds input
 * waiting: a peer fast enough never to make a read block must not outlive
 * it (an over-long line is read on to its end). */
static void test_deadline_with_input_waiting(void)
{
    int fd;
    pid_t pid = spawn(&fd, flood_child, NULL);
    struct io io;
    char buf[512];

    io_init(&io, fd, 2000);
    /* wait (up to 5 s) for the whole line to be in the socket */
    int waiting = 0;
    for (int i = 0; i < 500 && waiting < 40000; i++) {
        if (ioctl(fd, FIONREAD, &waiting) != 0)
            break;
        if (waiting < 40000)
            usleep(10 * 1000);
    }
    CHECK(waiting >= 40000);
    io_set_deadline(&io, io_clock_ms() - 1);
    CHECK(io_getline(&io, buf, sizeof buf, NULL) == IO_DEADLINE);
    CHECK(io.status == IO_DEADLINE);
    CHECK(io.bytes_in == 0);
    io_set_deadline(&io, 0);
    io.status = IO_OK;
    CHECK(io_getline(&io, buf, sizeof buf, NULL) == IO_TOOLONG);
    io_close(&io);
    CHECK(reap(pid) == 0);
}

/* ---- getseg ------------------------------------------------------------ */

#define SEG_BIG 10000

static size_t seg_data(char *out)
{
    size_t n = 0;

    memcpy(out, "short\r\n", 7);
    n += 7;
    memset(out + n, 'x', SEG_BIG);
    n += SEG_BIG;
    memcpy(out + n, "\r\ntail", 6);
    return n + 6;
}

static int seg_child(int fd, void *arg)
{
    static char data[SEG_BIG + 64];
    size_t n = seg_data(data);

    (void)arg;
    return put_raw(fd, data, n) ? 0 : 2;
}

static void test_getseg(void)
{
    static char want[SEG_BIG + 64], got[SEG_BIG + 64];
    size_t want_len = seg_data(want), got_len = 0;
    int fd;
    pid_t pid = spawn(&fd, seg_child, NULL);
    struct io io;
    char seg[4096];
    bool complete = true, shape_ok = true;
    struct trace_count tc = { 0, 0, 0 };
    int completes = 0;
    long n;

    io_init(&io, fd, 5000);
    io.trace = count_trace;   /* message data is never traced */
    io.trace_ctx = &tc;
    while ((n = io_getseg(&io, seg, sizeof seg, &complete)) > 0) {
        const char *lf = memchr(seg, '\n', (size_t)n);
        if (lf && lf != seg + n - 1)
            shape_ok = false;            /* stops after the first LF */
        if (complete != (seg[n - 1] == '\n'))
            shape_ok = false;
        completes += complete;
        if (got_len + (size_t)n > sizeof got)
            break;
        memcpy(got + got_len, seg, (size_t)n);
        got_len += (size_t)n;
    }
    CHECK(n == IO_EOF);
    CHECK(shape_ok);
    CHECK(completes == 2);
    CHECK(got_len == want_len && memcmp(got, want, want_len) == 0);
    CHECK(tc.in == 0 && tc.out == 0);
    io_close(&io);
    CHECK(reap(pid) == 0);
}

/* ---- pipelining -------------------------------------------------------- */

static int pipeline_child(int fd, void *arg)
{
    char b[64];
    ssize_t n;

    (void)arg;
    if (!put_raw(fd, "A\r\nB\r\n", 6))
        return 2;
    /* Both replies must come, and in one send: they were buffered while
     * the server still had input, and flushed before it waited. */
    n = read(fd, b, sizeof b);
    if (n != 6 || memcmp(b, "1\r\n2\r\n", 6) != 0)
        return 3;
    if (!put_raw(fd, "C\r\n", 3))
        return 4;
    n = read(fd, b, sizeof b);
    if (n != 3 || memcmp(b, "3\r\n", 3) != 0)
        return 5;
    drain_to_eof(fd);
    return 0;
}

static void test_pipelining(void)
{
    int fd;
    pid_t pid = spawn(&fd, pipeline_child, NULL);
    struct io io;
    struct trace_count tc = { 0, 0, 0 };
    char buf[64];

    io_init(&io, fd, 3000);
    io.trace = count_trace;
    io.trace_ctx = &tc;
    CHECK(io_getline(&io, buf, sizeof buf, NULL) == 1);
    CHECK(io_pending(&io) == 3);
    CHECK(io_printf(&io, "%d\r\n", 1));
    CHECK(io_getline(&io, buf, sizeof buf, NULL) == 1);
    CHECK_STR(buf, "B");
    CHECK(io_puts(&io, "2\r\n"));
    CHECK(io.wlen == 6 && io.bytes_out == 0);   /* still buffered */
    CHECK(io_getline(&io, buf, sizeof buf, NULL) == 1);   /* flushes */
    CHECK_STR(buf, "C");
    CHECK(io_write(&io, "3\r\n", 3) && io_flush(&io));
    CHECK(io.bytes_in == 9 && io.bytes_out == 9);
    CHECK(tc.in == 3 && tc.out == 3 && tc.out_bytes == 9);
    CHECK(io.status == IO_OK);
    io_close(&io);
    CHECK(reap(pid) == 0);
}

/* ---- TLS --------------------------------------------------------------- */

struct tls_files {
    char dir[64], cert[96], key[96], key2[96], both[96];
};

static bool write_pem(const char *path, X509 *x, EVP_PKEY *k)
{
    FILE *f = fopen(path, "w");
    bool ok = f && (x ? PEM_write_X509(f, x)
                      : PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL,
                                             NULL));
    if (f && fclose(f) != 0)
        ok = false;
    return ok;
}

/* Certificate and key in one file, as some operators keep them. */
static bool write_both(const char *path, X509 *x, EVP_PKEY *k)
{
    FILE *f = fopen(path, "w");
    bool ok = f && PEM_write_X509(f, x) &&
              PEM_write_PrivateKey(f, k, NULL, NULL, 0, NULL, NULL);
    if (f && fclose(f) != 0)
        ok = false;
    return ok;
}

/* A self-signed P-256 certificate for CERT_NAME, valid for a day. */
static X509 *make_cert(EVP_PKEY *key)
{
    X509 *x = X509_new();
    X509V3_CTX v3;
    X509_EXTENSION *san = NULL;
    bool ok = x != NULL;

    ok = ok && X509_set_version(x, 2) &&
         ASN1_INTEGER_set(X509_get_serialNumber(x), 1) &&
         X509_gmtime_adj(X509_getm_notBefore(x), -3600) &&
         X509_gmtime_adj(X509_getm_notAfter(x), 86400) &&
         X509_set_pubkey(x, key);
    X509_NAME *name = ok ? X509_get_subject_name(x) : NULL;
    ok = ok && X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                                          (const unsigned char *)CERT_NAME,
                                          -1, -1, 0) &&
         X509_set_issuer_name(x, name);
    if (ok) {
        X509V3_set_ctx_nodb(&v3);
        X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
        san = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_alt_name,
                                  "DNS:" CERT_NAME);
    }
    ok = ok && san && X509_add_ext(x, san, -1) &&
         X509_sign(x, key, EVP_sha256()) > 0;
    X509_EXTENSION_free(san);
    if (!ok) {
        X509_free(x);
        return NULL;
    }
    return x;
}

static bool make_tls_files(struct tls_files *tf)
{
    snprintf(tf->dir, sizeof tf->dir, "/tmp/odmr-test-io.XXXXXX");
    if (!mkdtemp(tf->dir))
        return false;
    snprintf(tf->cert, sizeof tf->cert, "%s/cert.pem", tf->dir);
    snprintf(tf->key, sizeof tf->key, "%s/key.pem", tf->dir);
    snprintf(tf->key2, sizeof tf->key2, "%s/key2.pem", tf->dir);
    snprintf(tf->both, sizeof tf->both, "%s/both.pem", tf->dir);

    EVP_PKEY *key = EVP_EC_gen("P-256");
    EVP_PKEY *key2 = EVP_EC_gen("P-256");
    X509 *x = key ? make_cert(key) : NULL;
    bool ok = x && key2 && write_pem(tf->cert, x, NULL) &&
              write_pem(tf->key, NULL, key) &&
              write_pem(tf->key2, NULL, key2) && write_both(tf->both, x, key);
    X509_free(x);
    EVP_PKEY_free(key);
    EVP_PKEY_free(key2);
    return ok;
}

static void remove_tls_files(const struct tls_files *tf)
{
    unlink(tf->cert);
    unlink(tf->key);
    unlink(tf->key2);
    unlink(tf->both);
    rmdir(tf->dir);
}

enum tls_mode { TLS_GOOD, TLS_REFUSED, TLS_INJECT, TLS_READAHEAD };

struct tls_case {
    SSL_CTX *ctx;
    enum tls_mode mode;
};

/* Server side after a good handshake: echo one line, count a bulk
 * transfer read with io_getseg, then drop the connection without
 * close_notify, as careless peers do. */
static int tls_server_session(struct io *io)
{
    char line[1100];
    unsigned long bytes = 0, lines = 0;
    bool complete = false;
    long n;

    if (io_getline(io, line, sizeof line, NULL) != 5 ||
        !io_printf(io, "250 %s\r\n", line))
        return 20;
    while ((n = io_getseg(io, line, sizeof line, &complete)) > 0) {
        if (complete && n == 5 && memcmp(line, "END\r\n", 5) == 0)
            break;
        bytes += (unsigned long)n;
        lines += complete;
    }
    if (n <= 0 || !io_printf(io, "250 %lu %lu\r\n", bytes, lines) ||
        !io_flush(io))
        return 21;
    if (io_getline(io, line, sizeof line, NULL) != 4 ||
        strcmp(line, "QUIT") != 0 || !io_puts(io, "221 bye\r\n") ||
        !io_flush(io))
        return 22;
    return 0;   /* exit without SSL_shutdown */
}

/* Both of the client's records are in the socket (a TLS 1.3 record of 5
 * bytes is 27 on the wire), waiting at most 5 s. */
static bool two_records_arrived(int fd)
{
    for (int i = 0; i < 500; i++) {
        int n = 0;
        if (ioctl(fd, FIONREAD, &n) == 0 && n >= 2 * 27)
            return true;
        usleep(10 * 1000);
    }
    return false;
}

/* Server side of test_tls_readahead: two records are in by the time the
 * first line is read; the second must count as pending input (linger
 * waits on the socket only when nothing is), the first line must not
 * swallow it.  The client writes them only after "go", so that neither
 * can arrive with the handshake's last read. */
static int tls_readahead_session(struct io *io)
{
    char line[64];
    if (!io_puts(io, "go\r\n") || !io_flush(io))
        return 29;
    if (!two_records_arrived(io->fd))
        return 35;
    if (io_getline(io, line, sizeof line, NULL) != 3 || strcmp(line, "ONE"))
        return 30;
    if (io_pending(io) == 0)
        return 31;
    if (io_getline(io, line, sizeof line, NULL) != 3 || strcmp(line, "TWO"))
        return 32;
    if (io_pending(io) != 0)
        return 33;
    return io_puts(io, "250 both\r\n") && io_flush(io) ? 0 : 34;
}

static int tls_server_child(int fd, void *arg)
{
    const struct tls_case *tc = arg;
    struct io io;
    char line[128], err[256] = "";

    io_init(&io, fd, 5000);
    if (io_getline(&io, line, sizeof line, NULL) != 8 ||
        strcmp(line, "STARTTLS") != 0)
        return 10;
    /* left buffered on purpose: io_starttls_server must flush it */
    io_puts(&io, tc->mode == TLS_INJECT ? "220 ready\r\nEVIL\r\n"
                                         : "220 ready\r\n");
    bool ok = io_starttls_server(&io, tc->ctx, err, sizeof err);
    if (tc->mode == TLS_INJECT) {
        io_close(&io);
        return !ok && strcmp(err, "plaintext data pending after STARTTLS")
                          == 0 ? 0 : 11;
    }
    if (tc->mode == TLS_REFUSED) {
        io_close(&io);
        return ok ? 12 : 0;
    }
    /* the client's first record may already be read ahead with its
     * Finished: pending input is allowed here, plaintext was refused above */
    if (!ok)
        return 13;
    return tc->mode == TLS_READAHEAD ? tls_readahead_session(&io)
                                     : tls_server_session(&io);
}

/* Runs the client side up to the end of the handshake; the server child
 * is left in *pid and the io open. */
static bool tls_client_start(struct io *io, pid_t *pid, SSL_CTX *sctx,
                             enum tls_mode mode, SSL_CTX *cctx,
                             const char *host, char *err, size_t n)
{
    static struct tls_case tc;   /* the child reads its copy after fork */
    char line[128];
    int fd;

    tc.ctx = sctx;
    tc.mode = mode;
    *pid = spawn(&fd, tls_server_child, &tc);
    io_init(io, fd, 5000);
    io_puts(io, mode == TLS_INJECT ? "STARTTLS\r\nEVIL\r\n" : "STARTTLS\r\n");
    if (io_getline(io, line, sizeof line, NULL) != 9 ||
        strcmp(line, "220 ready") != 0) {
        snprintf(err, n, "no 220 reply");
        return false;
    }
    return io_starttls_client(io, cctx, host, err, n);
}

static void tls_bulk(struct io *io)
{
    char line[1002], reply[64];

    for (int i = 0; i < 300; i++) {
        memset(line, 'a' + i % 26, 1000);
        memcpy(line + 1000, "\r\n", 2);
        if (!io_write(io, line, sizeof line))
            break;
    }
    CHECK(io_puts(io, "END\r\n"));
    CHECK(io_getline(io, reply, sizeof reply, NULL) > 0);
    CHECK_STR(reply, "250 300600 300");
}

static void test_tls_good(SSL_CTX *sctx, SSL_CTX *cctx)
{
    struct io io;
    pid_t pid;
    char err[256] = "", info[128], line[128];

    CHECK(tls_client_start(&io, &pid, sctx, TLS_GOOD, cctx, CERT_NAME, err,
                           sizeof err));
    CHECK_STR(err, "");
    io_tls_info(&io, info, sizeof info);
    CHECK(strncmp(info, "TLSv1.3 with cipher TLS_", 24) == 0);
    CHECK(strstr(info, " bits)") != NULL);
    CHECK(io_puts(&io, "HELLO\r\n"));
    CHECK(io_getline(&io, line, sizeof line, NULL) == 9);
    CHECK_STR(line, "250 HELLO");
    tls_bulk(&io);
    CHECK(io_puts(&io, "QUIT\r\n"));
    CHECK(io_getline(&io, line, sizeof line, NULL) == 7);
    CHECK_STR(line, "221 bye");
    /* peer vanished without close_notify: an ordinary EOF */
    CHECK(io_getline(&io, line, sizeof line, NULL) == IO_EOF);
    CHECK(io.bytes_out > 300000 && io.bytes_in > 20);
    io_close(&io);
    CHECK(reap(pid) == 0);
}

static void test_tls_refused(SSL_CTX *sctx, SSL_CTX *cctx, const char *host,
                             const char *want_err)
{
    struct io io;
    pid_t pid;
    char err[256] = "";

    CHECK(!tls_client_start(&io, &pid, sctx, TLS_REFUSED, cctx, host, err,
                            sizeof err));
    CHECK(strncmp(err, want_err, strlen(want_err)) == 0);
    if (strncmp(err, want_err, strlen(want_err)) != 0)
        printf("  err was: %s\n", err);
    CHECK(io.ssl == NULL);
    io_close(&io);
    CHECK(reap(pid) == 0);
}

/* Records sent one by one, read ahead together (tls_readahead_session). */
static void test_tls_readahead(SSL_CTX *sctx, SSL_CTX *cctx)
{
    struct io io;
    pid_t pid;
    char err[256] = "", line[64];

    CHECK(tls_client_start(&io, &pid, sctx, TLS_READAHEAD, cctx, CERT_NAME,
                           err, sizeof err));
    CHECK(io_getline(&io, line, sizeof line, NULL) == 2);
    CHECK_STR(line, "go");
    CHECK(io_puts(&io, "ONE\r\n") && io_flush(&io));
    CHECK(io_puts(&io, "TWO\r\n") && io_flush(&io));
    CHECK(io_getline(&io, line, sizeof line, NULL) == 8);
    CHECK_STR(line, "250 both");
    io_close(&io);
    CHECK(reap(pid) == 0);
}

static void test_tls_inject(SSL_CTX *sctx, SSL_CTX *cctx)
{
    struct io io;
    pid_t pid;
    char err[256] = "";

    CHECK(!tls_client_start(&io, &pid, sctx, TLS_INJECT, cctx, CERT_NAME,
                            err, sizeof err));
    CHECK_STR(err, "plaintext data pending after STARTTLS");
    io_close(&io);
    CHECK(reap(pid) == 0);
}

static void test_tls_ctx_errors(const struct tls_files *tf)
{
    char err[512] = "";
    SSL_CTX *ctx;

    ctx = tls_server_ctx(tf->cert, tf->key2, err, sizeof err);
    CHECK(ctx == NULL);
    CHECK(strstr(err, "does not match certificate") != NULL);
    SSL_CTX_free(ctx);

    ctx = tls_server_ctx("/nonexistent/cert.pem", tf->key, err, sizeof err);
    CHECK(ctx == NULL);
    CHECK(strncmp(err, "cannot load certificate /nonexistent/cert.pem: ",
                  47) == 0);
    CHECK(strchr(err, '\n') == NULL);
    SSL_CTX_free(ctx);

    ctx = tls_server_ctx(tf->cert, "", err, sizeof err);
    CHECK(ctx == NULL);
    CHECK(strncmp(err, "cannot load private key ", 24) == 0);
    SSL_CTX_free(ctx);

    ctx = tls_client_ctx("/nonexistent/ca.pem", err, sizeof err);
    CHECK(ctx == NULL);
    CHECK(strncmp(err, "cannot load CA file /nonexistent/ca.pem: ", 41) == 0);
    SSL_CTX_free(ctx);

    /* key_file "" means: the key is in the certificate file */
    ctx = tls_server_ctx(tf->both, "", err, sizeof err);
    CHECK(ctx != NULL);
    SSL_CTX_free(ctx);
}

static int closing_child(int fd, void *arg)
{
    (void)fd;
    (void)arg;
    return 0;   /* exiting closes the socket */
}

/* A peer that never answers the ClientHello, and one that hangs up. */
static void test_tls_handshake_failures(SSL_CTX *sctx, SSL_CTX *cctx)
{
    struct io io;
    int fd;
    char err[256] = "";
    pid_t pid = spawn(&fd, silent_child, NULL);

    io_init(&io, fd, 200);
    CHECK(!io_starttls_client(&io, cctx, CERT_NAME, err, sizeof err));
    CHECK_STR(err, "TLS handshake timed out");
    CHECK(io.status == IO_TIMEOUT && io.ssl == NULL);
    io_close(&io);
    CHECK(reap(pid) == 0);

    pid = spawn(&fd, closing_child, NULL);
    io_init(&io, fd, 5000);
    CHECK(!io_starttls_server(&io, sctx, err, sizeof err));
    CHECK_STR(err, "connection closed during TLS handshake");
    CHECK(io.status == IO_EOF);
    io_close(&io);
    CHECK(reap(pid) == 0);
}

static void test_tls(void)
{
    struct tls_files tf;
    char err[512] = "";

    CHECK(make_tls_files(&tf));
    SSL_CTX *sctx = tls_server_ctx(tf.cert, tf.key, err, sizeof err);
    CHECK(sctx != NULL);
    SSL_CTX *cctx = tls_client_ctx(tf.cert, err, sizeof err);
    CHECK(cctx != NULL);
    SSL_CTX *sys = tls_client_ctx(NULL, err, sizeof err);
    CHECK(sys != NULL);
    if (sctx && cctx && sys) {
        test_tls_good(sctx, cctx);
        test_tls_refused(sctx, cctx, "wrong.example.test",
                         "certificate does not match host "
                         "wrong.example.test");
        /* our self-signed certificate is not in the system store */
        test_tls_refused(sctx, sys, CERT_NAME, "certificate verify failed: ");
        test_tls_inject(sctx, cctx);
        test_tls_readahead(sctx, cctx);
        test_tls_handshake_failures(sctx, cctx);
    }
    test_tls_ctx_errors(&tf);
    SSL_CTX_free(sctx);
    SSL_CTX_free(cctx);
    SSL_CTX_free(sys);
    remove_tls_files(&tf);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);   /* as the programs do, for OpenSSL writes */
    test_getline();
    test_read_timeout();
    test_write_timeout();
    test_line_deadline();
    test_phase_deadline();
    test_deadline_with_input_waiting();
    test_getseg();
    test_pipelining();
    test_tls();
    CHECK_DONE();
}
