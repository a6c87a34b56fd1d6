/* io.c - buffered line I/O over a plain or TLS socket (see io.h).
 *
 * Decisions worth knowing when calling this module:
 *
 *  - The socket is non-blocking and every wait is one poll() bounded by
 *    timeout_ms (<= 0 means 300 s).  The bound is per wait, i.e. "no
 *    progress for timeout_ms"; a poll interrupted by a signal is resumed
 *    with the time that is left, measured on CLOCK_MONOTONIC.
 *
 *  - A per-wait bound alone lets a peer that sends one byte every few
 *    seconds hold a session forever, so two deadlines shorten it: the line
 *    deadline (from the first byte of a line read by io_getline to its LF)
 *    and an absolute one set by the caller (a whole phase, e.g. DATA).  A
 *    wait cut short by either fails with IO_DEADLINE, not IO_TIMEOUT, so
 *    that the log can tell a trickling peer from a silent one.
 *
 *  - Output is buffered and flushed before the next read from the socket,
 *    i.e. once every line already read has been handled.  A pipelining
 *    client (RFC 2920) therefore always gets the replies it waits for, and
 *    the replies to a batch of commands that arrived together leave in one
 *    packet.  The socket is not asked first whether more input is there
 *    (as Postfix's streams do not): a client in lock step never has any,
 *    so that read said EAGAIN before nearly every reply (6 of 13 reads of
 *    an inbound message); the price is one more packet when a pipelined
 *    batch arrives split and its second part is already in.  For the same
 *    reason a read that follows a flush first waits for input.
 *
 *  - io_getline keeps NUL bytes: the returned length is authoritative and
 *    buf is NUL-terminated after it.  A caller that parses buf as a C string
 *    must reject lines where strlen(buf) != length (hostile input).
 *    After IO_TOOLONG, buf holds the first max-1 bytes of the line (for a
 *    log line); after EOF/timeout/error it holds "".
 *
 *  - io_getseg does not NUL-terminate: it is for message data.
 *
 *  - A failed flush drops the rest of the output buffer and shuts the
 *    sending direction down: the stream is corrupt at that point, and this
 *    makes every later write fail at once instead of waiting again for a
 *    peer that does not read.  Reads (if any) still work.
 *
 *  - SIGPIPE: plain sockets are written with send(MSG_NOSIGNAL).  OpenSSL
 *    writes through its own socket BIO with write(), which raises SIGPIPE on
 *    a reset connection, so the programs ignore SIGPIPE; a reset peer then
 *    shows up as IO_ERROR.
 */
#include "io.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/x509v3.h>
#include "tls_ticket.h"

#define IO_DEFAULT_TIMEOUT_MS 300000
/* io_close gives queued output and close_notify at most this long: closing
 * must not hang for a full protocol timeout on a peer that stopped reading. */
#define IO_CLOSE_TIMEOUT_MS 2000
/* io_printf formats into the stack first; longer output goes to the heap. */
#define IO_PRINTF_STACK 1024

/* Forward secrecy and AEAD first; ECDHE+AES (CBC) only as the last resort
 * for old SMTP peers, since RFC 7435 prefers some encryption to none.
 * TLS 1.3 suites are OpenSSL's defaults. */
#define SERVER_CIPHERS                                                  \
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:ECDHE+AES:"   \
    "!aNULL:!eNULL"

/* ---- time and waiting ------------------------------------------------ */

static int64_t mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t io_clock_ms(void)
{
    return mono_ms();
}

static int timeout_of(const struct io *io)
{
    return io->timeout_ms > 0 ? io->timeout_ms : IO_DEFAULT_TIMEOUT_MS;
}

/* Waits until fd is ready for events, at most timeout_ms in total even when
 * signals interrupt poll().  POLLERR/POLLHUP count as ready: the following
 * read or write reports what actually happened. */
static enum io_status wait_fd(int fd, short events, int timeout_ms)
{
    int64_t deadline = mono_ms() + timeout_ms;

    for (;;) {
        int64_t left = deadline - mono_ms();
        if (left <= 0)
            return IO_TIMEOUT;
        struct pollfd p = { .fd = fd, .events = events, .revents = 0 };
        int r = poll(&p, 1, (int)left);
        if (r > 0)
            return (p.revents & POLLNVAL) ? IO_ERROR : IO_OK;
        if (r == 0)
            return IO_TIMEOUT;
        if (errno != EINTR)
            return IO_ERROR;
    }
}

/* The bound of the next wait and what running out of it means: the idle
 * timeout, or IO_DEADLINE when a deadline (the caller's phase deadline or
 * line_due, 0 = none) comes first. */
struct wait_limit {
    int ms;
    enum io_status expiry;
};

static struct wait_limit wait_limit(const struct io *io, int64_t line_due)
{
    struct wait_limit w = { timeout_of(io), IO_TIMEOUT };
    int64_t due = io->deadline;

    if (line_due && (!due || line_due < due))
        due = line_due;
    if (due) {
        int64_t left = due - mono_ms();
        if (left < w.ms) {
            w.ms = left > 0 ? (int)left : 0;
            w.expiry = IO_DEADLINE;
        }
    }
    return w;
}

/* wait_fd on the io's socket within its timeout and deadlines. */
static enum io_status wait_io(const struct io *io, short events,
                              int64_t line_due)
{
    struct wait_limit w = wait_limit(io, line_due);
    enum io_status st = wait_fd(io->fd, events, w.ms);

    return st == IO_TIMEOUT ? w.expiry : st;
}

static enum io_status fail(struct io *io, enum io_status st)
{
    io->status = st;
    return st;
}

/* ---- one non-blocking transfer ---------------------------------------- */

/* After an SSL call returned ret <= 0: 0 means "would block, wait for *ev",
 * a negative value is the final io_status. */
static long tls_blocked(struct io *io, int ret, short *ev)
{
    switch (SSL_get_error(io->ssl, ret)) {
    case SSL_ERROR_WANT_READ:
        *ev = POLLIN;
        return 0;
    case SSL_ERROR_WANT_WRITE:
        *ev = POLLOUT;
        return 0;
    case SSL_ERROR_ZERO_RETURN:
        return IO_EOF;
    case SSL_ERROR_SSL:
        /* Many SMTP peers close without close_notify; the protocol has its
         * own end markers, so a bare TCP close is an ordinary EOF. */
        if (ERR_GET_REASON(ERR_peek_error()) ==
            SSL_R_UNEXPECTED_EOF_WHILE_READING)
            return IO_EOF;
        return IO_ERROR;
    default:
        return IO_ERROR;
    }
}

/* recv()/send() with a read()/write() fallback, so that a pipe or a
 * terminal (tests, inetd-style use) works as well as a socket. */
static ssize_t sys_recv(int fd, void *buf, size_t len)
{
    ssize_t n = recv(fd, buf, len, 0);
    if (n < 0 && errno == ENOTSOCK)
        n = read(fd, buf, len);
    return n;
}

static ssize_t sys_send(int fd, const void *buf, size_t len)
{
    ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
    if (n < 0 && errno == ENOTSOCK)
        n = write(fd, buf, len);
    return n;
}

/* One attempt to read into rbuf: bytes (> 0), 0 = would block on *ev, or a
 * negative io_status. */
static long read_once(struct io *io, short *ev)
{
    if (io->ssl) {
        size_t n = 0;
        ERR_clear_error();
        int r = SSL_read_ex(io->ssl, io->rbuf, sizeof io->rbuf, &n);
        return r == 1 ? (long)n : tls_blocked(io, r, ev);
    }
    for (;;) {
        ssize_t n = sys_recv(io->fd, io->rbuf, sizeof io->rbuf);
        if (n > 0)
            return (long)n;
        if (n == 0)
            return IO_EOF;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            *ev = POLLIN;
            return 0;
        }
        return IO_ERROR;
    }
}

/* write_once on the socket itself, past any TLS. */
static long sock_write_once(int fd, const char *p, size_t len, short *ev)
{
    for (;;) {
        ssize_t n = sys_send(fd, p, len);
        if (n > 0)
            return (long)n;
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0 || errno == EAGAIN || errno == EWOULDBLOCK) {
            *ev = POLLOUT;
            return 0;
        }
        return IO_ERROR;
    }
}

/* One attempt to write len (> 0) bytes: bytes written, 0 = would block on
 * *ev, or a negative io_status.  For TLS a retry after "would block" must
 * pass the same buffer and length, which io_flush does. */
static long write_once(struct io *io, const char *p, size_t len, short *ev)
{
    if (io->ssl) {
        size_t n = 0;
        ERR_clear_error();
        int r = SSL_write_ex(io->ssl, p, len, &n);
        return r == 1 ? (long)n : tls_blocked(io, r, ev);
    }
    return sock_write_once(io->fd, p, len, ev);
}

/* ---- setup and teardown ----------------------------------------------- */

void io_init(struct io *io, int fd, int timeout_ms)
{
    /* Field by field: the two 16 KB buffers need no clearing, and this
     * runs once per session. */
    io->fd = fd;
    io->ssl = NULL;
    io->timeout_ms = timeout_ms;
    io->line_deadline_ms = 0;
    io->deadline = 0;
    io->status = IO_OK;
    io->rpos = io->rlen = io->wlen = 0;
    io->bytes_in = io->bytes_out = 0;
    io->trace = NULL;
    io->trace_ctx = NULL;

    /* FIONBIO sets O_NONBLOCK alone, in one call instead of F_GETFL +
     * F_SETFL: this runs for every connection. */
    int on = 1;
    if (ioctl(fd, FIONBIO, &on) != 0)
        io->status = IO_ERROR;

    /* We coalesce output ourselves and flush deliberately, so Nagle's
     * algorithm could only add delayed-ACK stalls (e.g. the short tail of a
     * message after full segments).  Fails harmlessly on non-TCP sockets. */
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

void io_set_line_deadline(struct io *io, int ms)
{
    io->line_deadline_ms = ms > 0 ? ms : 0;
}

void io_set_deadline(struct io *io, int64_t when)
{
    io->deadline = when;
}

void io_deadline_within_timeout(struct io *io)
{
    int64_t due = mono_ms() + timeout_of(io);
    if (!io->deadline || due < io->deadline)
        io->deadline = due;
}

/* Sends len bytes on the socket itself, past OpenSSL (records it has
 * already made), waiting as io_flush does. */
static void send_raw(struct io *io, const char *p, size_t len)
{
    while (len > 0) {
        short ev = 0;
        long n = sock_write_once(io->fd, p, len, &ev);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
        } else if (n < 0 || wait_io(io, ev, 0) != IO_OK) {
            return;
        }
    }
}

/* The last reply and close_notify leave in one packet: both records are
 * made into a memory BIO and sent with one send(), where writing through
 * the socket BIO took one write each (two of a TLS poll's eleven).  The
 * socket BIO stays the read side.  We do not wait for the peer's
 * close_notify. */
static void tls_close(struct io *io)
{
    ERR_clear_error();
    BIO *mem = BIO_new(BIO_s_mem());
    if (!mem) {
        if (io->wlen > 0)
            (void)io_flush(io);
        (void)SSL_shutdown(io->ssl);
        return;
    }
    SSL_set0_wbio(io->ssl, mem);   /* the SSL owns it from here */
    size_t n = 0;
    if (io->wlen == 0 || SSL_write_ex(io->ssl, io->wbuf, io->wlen, &n) == 1) {
        io->bytes_out += (unsigned long long)n;
        (void)SSL_shutdown(io->ssl);
    }
    io->wlen = 0;
    char *out = NULL;
    long len = BIO_get_mem_data(mem, &out);
    if (len > 0)
        send_raw(io, out, (size_t)len);
}

void io_close(struct io *io)
{
    if (io->fd < 0)
        return;
    /* Closing has its own short bound; a deadline that has passed must
     * not keep the last reply (a 421 saying so) from going out. */
    io->deadline = 0;
    if (timeout_of(io) > IO_CLOSE_TIMEOUT_MS)
        io->timeout_ms = IO_CLOSE_TIMEOUT_MS;
    /* OpenSSL forbids SSL_shutdown after a fatal error, which is what
     * IO_ERROR means here. */
    if (io->ssl && io->status != IO_ERROR)
        tls_close(io);
    else if (io->wlen > 0)
        (void)io_flush(io);
    if (io->ssl) {
        SSL_free(io->ssl);
        io->ssl = NULL;
    }
    ERR_clear_error();
    close(io->fd);
    io->fd = -1;
    io->rpos = io->rlen = io->wlen = 0;
}

/* ---- reading ----------------------------------------------------------- */

/* Whether input may be there without asking the kernel: TLS records that
 * OpenSSL has read but not yet handed out. */
static bool input_buffered(const struct io *io)
{
    return io->ssl && SSL_has_pending(io->ssl);
}

/* Whether the phase deadline or line_due (0: none) has passed.  Checked
 * before every read, not only when a read would block: a peer sending
 * fast enough never makes it block, and an over-long line or endless
 * data would then outlive every deadline. */
static bool past_due(const struct io *io, int64_t line_due)
{
    if (!io->deadline && !line_due)
        return false;
    int64_t now = mono_ms();
    return (io->deadline && now >= io->deadline) ||
           (line_due && now >= line_due);
}

/* Refills the empty rbuf, waiting no later than *line_due (0: none yet;
 * line_due NULL: no line deadline at all).  Under TLS a line begins with
 * the first octet of the record that carries it: a peer trickling one
 * record octet by octet sends no plaintext, so *line_due is set once a
 * record has begun.  Pending output goes first (see the top of the file). */
static enum io_status fill(struct io *io, int64_t *line_due)
{
    io->rpos = io->rlen = 0;
    /* Right after a reply has left, a peer in lock step cannot have
     * answered yet: wait before reading, not after a read that says
     * EAGAIN (7 of a TLS poll's 24 reads; through OpenSSL each costs
     * more than the system call).  Input that is there already only makes
     * the wait return at once. */
    bool wait_first = false;
    if (io->wlen > 0 && !input_buffered(io)) {
        if (!io_flush(io))
            return io->status;
        wait_first = true;
    }
    for (;;) {
        if (past_due(io, line_due ? *line_due : 0))
            return IO_DEADLINE;
        if (wait_first) {
            wait_first = false;
            enum io_status st = wait_io(io, POLLIN, line_due ? *line_due : 0);
            if (st != IO_OK)
                return st;
        }
        short ev = 0;
        long n = read_once(io, &ev);
        if (n > 0) {
            io->rlen = (size_t)n;
            io->bytes_in += (unsigned long long)n;
            return IO_OK;
        }
        if (n < 0)
            return (enum io_status)n;
        if (io->wlen > 0) {   /* TLS: the buffered records were not enough */
            if (!io_flush(io))
                return io->status;
            continue;
        }
        if (line_due && !*line_due && io->line_deadline_ms > 0 &&
            input_buffered(io))
            *line_due = mono_ms() + io->line_deadline_ms;
        enum io_status st = wait_io(io, ev, line_due ? *line_due : 0);
        if (st != IO_OK)
            return st;
    }
}

size_t io_pending(const struct io *io)
{
    size_t n = io->rlen - io->rpos;
    if (io->ssl) {
        n += (size_t)SSL_pending(io->ssl);
        /* records read ahead but not yet decrypted: their size is not
         * known, only that input is there */
        if (n == 0 && SSL_has_pending(io->ssl))
            n = 1;
    }
    return n;
}

long io_getline(struct io *io, char *buf, size_t max, bool *bare_lf)
{
    size_t cap = max > 0 ? max - 1 : 0;   /* room for content */
    size_t total = 0;                     /* bytes before the LF so far */
    size_t stored = 0;                    /* of those, copied into buf */
    char last = 0;                        /* last of them: CR or not */
    int64_t line_due = 0;                 /* set once the line has begun */

    if (bare_lf)
        *bare_lf = false;
    for (;;) {
        if (io->rpos == io->rlen) {
            if (total > 0 && !line_due && io->line_deadline_ms > 0)
                line_due = mono_ms() + io->line_deadline_ms;
            enum io_status st = fill(io, &line_due);
            if (st != IO_OK) {
                if (max > 0)
                    buf[0] = '\0';
                return fail(io, st);   /* EOF mid-line included */
            }
        }
        const char *p = io->rbuf + io->rpos;
        size_t avail = io->rlen - io->rpos;
        const char *lf = memchr(p, '\n', avail);
        size_t n = lf ? (size_t)(lf - p) : avail;
        size_t copy = n < cap - stored ? n : cap - stored;

        if (copy > 0) {
            memcpy(buf + stored, p, copy);
            stored += copy;
        }
        if (n > 0)
            last = p[n - 1];
        /* Saturate rather than wrap on an endless line. */
        total = total > SIZE_MAX - n ? SIZE_MAX : total + n;
        io->rpos += n + (lf ? 1 : 0);
        if (lf)
            break;
    }

    bool crlf = total > 0 && last == '\r';
    size_t len = total - (crlf ? 1 : 0);
    if (bare_lf)
        *bare_lf = !crlf;
    if (len > cap) {
        if (max > 0)
            buf[stored] = '\0';
        return fail(io, IO_TOOLONG);
    }
    /* len <= stored here: at most the CR was left out of buf. */
    if (max > 0)
        buf[len] = '\0';
    if (io->trace)
        io->trace(io->trace_ctx, false, buf, len);
    return (long)len;
}

long io_getseg(struct io *io, char *buf, size_t max, bool *complete)
{
    if (complete)
        *complete = false;
    if (max == 0)
        return fail(io, IO_ERROR);   /* a caller bug: nothing can fit */
    if (io->rpos == io->rlen) {
        enum io_status st = fill(io, NULL);
        if (st != IO_OK)
            return fail(io, st);
    }
    const char *p = io->rbuf + io->rpos;
    size_t n = io->rlen - io->rpos;
    if (n > max)
        n = max;
    const char *lf = memchr(p, '\n', n);
    if (lf)
        n = (size_t)(lf - p) + 1;
    memcpy(buf, p, n);
    io->rpos += n;
    if (complete)
        *complete = lf != NULL;
    return (long)n;
}

/* ---- writing ----------------------------------------------------------- */

static void write_failed(struct io *io, enum io_status st)
{
    io->wlen = 0;
    io->status = st;
    (void)shutdown(io->fd, SHUT_WR);   /* why: see the top of the file */
}

bool io_flush(struct io *io)
{
    size_t off = 0;

    while (off < io->wlen) {
        short ev = 0;
        long n = write_once(io, io->wbuf + off, io->wlen - off, &ev);
        if (n > 0) {
            off += (size_t)n;
            io->bytes_out += (unsigned long long)n;
            continue;
        }
        enum io_status st = n < 0 ? (enum io_status)n : wait_io(io, ev, 0);
        if (st != IO_OK) {
            write_failed(io, st);
            return false;
        }
    }
    io->wlen = 0;
    return true;
}

bool io_write(struct io *io, const void *data, size_t len)
{
    const char *p = data;

    if (io->trace && len > 0)
        io->trace(io->trace_ctx, true, p, len);
    while (len > 0) {
        if (io->wlen == sizeof io->wbuf && !io_flush(io))
            return false;
        size_t room = sizeof io->wbuf - io->wlen;
        size_t n = len < room ? len : room;
        memcpy(io->wbuf + io->wlen, p, n);
        io->wlen += n;
        p += n;
        len -= n;
    }
    return true;
}

bool io_puts(struct io *io, const char *s)
{
    return io_write(io, s, strlen(s));
}

bool io_printf(struct io *io, const char *fmt, ...)
{
    char small[IO_PRINTF_STACK];
    va_list ap, ap2;

    va_start(ap, fmt);
    va_copy(ap2, ap);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) {
        va_end(ap2);
        return false;
    }
    if ((size_t)n < sizeof small) {
        va_end(ap2);
        return io_write(io, small, (size_t)n);
    }
    char *big = malloc((size_t)n + 1);
    bool ok = big && vsnprintf(big, (size_t)n + 1, fmt, ap2) == n &&
              io_write(io, big, (size_t)n);
    va_end(ap2);
    free(big);
    return ok;
}

/* ---- TLS sessions ------------------------------------------------------ */

/* Copies the most specific reason in the OpenSSL error queue and empties
 * it.  The oldest entry names the root cause ("No such file or
 * directory", "no start line"); its detail text, when there is one, says
 * more ("Expecting: TRUSTED CERTIFICATE"), except for system errors where
 * it only repeats the call. */
static void ssl_reason(char *buf, size_t n)
{
    const char *data = NULL;
    int flags = 0;
    unsigned long e = ERR_get_error_all(NULL, NULL, NULL, &data, &flags);
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    bool detail = data && *data && (flags & ERR_TXT_STRING);

    if (e && ERR_SYSTEM_ERROR(e))
        snprintf(buf, n, "%s", strerror(ERR_GET_REASON(e)));
    else if (r && detail)
        snprintf(buf, n, "%s (%s)", r, data);
    else if (r)
        snprintf(buf, n, "%s", r);
    else if (e)
        ERR_error_string_n(e, buf, n);
    else
        snprintf(buf, n, "unknown error");
    ERR_clear_error();
}

/* "prefix: reason" from the error queue. */
static void tls_err(char *err, size_t n, const char *prefix)
{
    char reason[256];

    ssl_reason(reason, sizeof reason);
    snprintf(err, n, "%s: %s", prefix, reason);
}

static bool is_ip_literal(const char *host)
{
    unsigned char addr[sizeof(struct in6_addr)];

    return inet_pton(AF_INET, host, addr) == 1 ||
           inet_pton(AF_INET6, host, addr) == 1;
}

/* Name the client expects in the server certificate; also sent as SNI
 * unless it is an address literal, which RFC 6066 forbids in SNI. */
static bool tls_set_peer_name(SSL *ssl, const char *host)
{
    if (!host || !*host)
        return true;
    if (is_ip_literal(host))
        return X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host) == 1;
    SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    return SSL_set1_host(ssl, host) == 1 &&
           SSL_set_tlsext_host_name(ssl, host) == 1;
}

/* A handshake is bounded like a command line (it is what the peer sends
 * in place of one): a peer trickling its ClientHello is cut off. */
static enum io_status tls_handshake(struct io *io)
{
    int64_t due = io->line_deadline_ms > 0 ? mono_ms() + io->line_deadline_ms
                                           : 0;
    for (;;) {
        short ev = 0;
        ERR_clear_error();
        int r = SSL_do_handshake(io->ssl);
        if (r == 1)
            return IO_OK;
        long st = tls_blocked(io, r, &ev);
        if (st < 0)
            return (enum io_status)st;
        enum io_status w = wait_io(io, ev, due);
        if (w != IO_OK)
            return w;
    }
}

/* The client's own check after the handshake, so that a context without
 * SSL_VERIFY_PEER can never yield an unverified session. */
static bool tls_peer_verified(SSL *ssl, const char *host)
{
    X509 *cert = SSL_get0_peer_certificate(ssl);

    if (!cert || SSL_get_verify_result(ssl) != X509_V_OK)
        return false;
    /* A resumed session carries the verify result of the handshake that
     * made it, but OpenSSL does not check the name again: do it here, so
     * a session can never stand in for a server of another name. */
    if (!SSL_session_reused(ssl) || !host || !*host)
        return true;
    if (is_ip_literal(host))
        return X509_check_ip_asc(cert, host, 0) == 1;
    return X509_check_host(cert, host, 0,
                           X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, NULL) == 1;
}

static void handshake_err(SSL *ssl, bool server, enum io_status st,
                          const char *host, char *err, size_t n)
{
    long v = SSL_get_verify_result(ssl);

    if (!server && st == IO_OK && v == X509_V_OK &&
        !SSL_get0_peer_certificate(ssl))
        snprintf(err, n, "server sent no certificate");
    else if (!server && st == IO_OK && v == X509_V_OK)
        snprintf(err, n, "resumed TLS session does not match host %s",
                 host ? host : "");
    else if (!server && (v == X509_V_ERR_HOSTNAME_MISMATCH ||
                         v == X509_V_ERR_IP_ADDRESS_MISMATCH))
        snprintf(err, n, "certificate does not match host %s",
                 host ? host : "");
    else if (!server && v != X509_V_OK)
        snprintf(err, n, "certificate verify failed: %s",
                 X509_verify_cert_error_string(v));
    else if (st == IO_TIMEOUT || st == IO_DEADLINE)
        snprintf(err, n, "TLS handshake timed out");
    else if (st == IO_EOF)
        snprintf(err, n, "connection closed during TLS handshake");
    else if (ERR_peek_error() == 0 && errno != 0)
        snprintf(err, n, "TLS handshake failed: %s", strerror(errno));
    else
        tls_err(err, n, "TLS handshake failed");
    ERR_clear_error();
}

static bool tls_start(struct io *io, SSL_CTX *ctx, bool server,
                      const char *host, SSL_SESSION *resume, char *err,
                      size_t n)
{
    if (io->ssl) {
        snprintf(err, n, "TLS is already active");
        return false;
    }
    /* RFC 3207 section 6: anything the peer sent after the STARTTLS
     * command/reply was sent in clear text and must not be taken as if it
     * had come over TLS. */
    if (io_pending(io) != 0) {
        snprintf(err, n, "plaintext data pending after STARTTLS");
        return false;
    }
    if (!io_flush(io)) {
        snprintf(err, n, "cannot send data before the TLS handshake");
        return false;
    }
    ERR_clear_error();
    SSL *ssl = SSL_new(ctx);
    if (!ssl || SSL_set_fd(ssl, io->fd) != 1 ||
        (!server && !tls_set_peer_name(ssl, host))) {
        tls_err(err, n, "cannot set up TLS session");
        SSL_free(ssl);
        fail(io, IO_ERROR);
        return false;
    }
    /* One read() takes whatever records have arrived, instead of one for
     * each record's header and one for its body (a resumed poll made 21
     * reads, 8 of them avoidable).  What OpenSSL then holds unprocessed
     * is input too: see input_buffered and io_pending (linger's wait).
     * Plaintext is never read ahead: the STARTTLS checks run before. */
    SSL_set_read_ahead(ssl, 1);
    if (server)
        SSL_set_accept_state(ssl);
    else
        SSL_set_connect_state(ssl);
    /* A session that cannot be offered only costs a full handshake. */
    if (resume && SSL_set_session(ssl, resume) != 1)
        ERR_clear_error();

    io->ssl = ssl;
    io->rpos = io->rlen = 0;
    errno = 0;
    enum io_status st = tls_handshake(io);
    if (st == IO_OK && (server || tls_peer_verified(ssl, host)))
        return true;
    handshake_err(ssl, server, st, host, err, n);
    SSL_free(ssl);
    io->ssl = NULL;
    fail(io, st == IO_OK ? IO_ERROR : st);
    return false;
}

bool io_starttls_server(struct io *io, SSL_CTX *ctx, char *err, size_t n)
{
    return tls_start(io, ctx, true, NULL, NULL, err, n);
}

bool io_starttls_client(struct io *io, SSL_CTX *ctx, const char *host,
                        char *err, size_t n)
{
    return tls_start(io, ctx, false, host, NULL, err, n);
}

bool io_starttls_client_resume(struct io *io, SSL_CTX *ctx, const char *host,
                               SSL_SESSION *resume, char *err, size_t n)
{
    return tls_start(io, ctx, false, host, resume, err, n);
}

bool io_tls_resumed(const struct io *io)
{
    return io->ssl && SSL_session_reused(io->ssl) == 1;
}

void io_tls_info(const struct io *io, char *buf, size_t n)
{
    if (n == 0)
        return;
    buf[0] = '\0';
    if (!io->ssl)
        return;
    const SSL_CIPHER *c = SSL_get_current_cipher(io->ssl);
    int alg_bits = 0;
    int bits = c ? SSL_CIPHER_get_bits(c, &alg_bits) : 0;
    snprintf(buf, n, "%s with cipher %s (%d/%d bits)",
             SSL_get_version(io->ssl), c ? SSL_CIPHER_get_name(c) : "unknown",
             bits, alg_bits);
}

/* ---- TLS contexts ------------------------------------------------------ */

/* Settings both sides share: TLS 1.2 minimum, no compression (CRIME), no
 * renegotiation (a DoS lever, and pointless for short sessions). */
static bool tls_ctx_common(SSL_CTX *ctx)
{
    if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1)
        return false;
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
    return true;
}

static bool key_mismatch(void)
{
    unsigned long e = ERR_peek_last_error();

    return ERR_GET_LIB(e) == ERR_LIB_X509 &&
           ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH;
}

/* Loads the certificate chain and its key; key_file NULL or "" means the
 * key is in cert_file too. */
static bool load_cert_key(SSL_CTX *ctx, const char *cert_file,
                          const char *key_file, char *err, size_t n)
{
    char what[512];

    if (!key_file || !*key_file)
        key_file = cert_file;
    if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
        snprintf(what, sizeof what, "cannot load certificate %s", cert_file);
        tls_err(err, n, what);
        return false;
    }
    ERR_clear_error();
    /* A key of the certificate's type that does not match is refused while
     * loading, a key of another type only by the check. */
    bool loaded = SSL_CTX_use_PrivateKey_file(ctx, key_file,
                                              SSL_FILETYPE_PEM) == 1;
    if (!loaded && !key_mismatch()) {
        snprintf(what, sizeof what, "cannot load private key %s", key_file);
        tls_err(err, n, what);
        return false;
    }
    if (!loaded || SSL_CTX_check_private_key(ctx) != 1) {
        snprintf(err, n, "private key %s does not match certificate %s",
                 key_file, cert_file);
        ERR_clear_error();
        return false;
    }
    return true;
}

SSL_CTX *tls_server_ctx(const char *cert_file, const char *key_file,
                        char *err, size_t n)
{
    if (!cert_file || !*cert_file) {
        snprintf(err, n, "no TLS certificate file given");
        return NULL;
    }
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        tls_err(err, n, "cannot create TLS context");
        return NULL;
    }
    if (!tls_ctx_common(ctx) ||
        SSL_CTX_set_cipher_list(ctx, SERVER_CIPHERS) != 1 ||
        SSL_CTX_set_dh_auto(ctx, 1) != 1) {
        tls_err(err, n, "cannot configure TLS context");
        SSL_CTX_free(ctx);
        return NULL;
    }
    SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
    if (!tls_ticket_enable(ctx)) {
        tls_err(err, n, "cannot set up TLS session tickets");
        SSL_CTX_free(ctx);
        return NULL;
    }
    if (!load_cert_key(ctx, cert_file, key_file, err, n)) {
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

SSL_CTX *tls_client_ctx(const char *ca_file, char *err, size_t n)
{
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) {
        tls_err(err, n, "cannot create TLS context");
        return NULL;
    }
    if (!tls_ctx_common(ctx)) {
        tls_err(err, n, "cannot configure TLS context");
        SSL_CTX_free(ctx);
        return NULL;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (ca_file && *ca_file) {
        if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
            char what[512];
            snprintf(what, sizeof what, "cannot load CA file %s", ca_file);
            tls_err(err, n, what);
            SSL_CTX_free(ctx);
            return NULL;
        }
        /* Everything in an explicitly configured file is a trust anchor,
         * so an operator may pin the provider's own (non-root) cert. */
        X509_VERIFY_PARAM_set_flags(SSL_CTX_get0_param(ctx),
                                    X509_V_FLAG_PARTIAL_CHAIN);
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
        tls_err(err, n, "cannot load the system trust store");
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}
