/* io.h - buffered line I/O over a plain or TLS socket.
 *
 * Every read and write waits at most io->timeout_ms for progress, and never
 * past the deadlines set below; every line has a caller-supplied maximum.
 * Replies written with io_write/io_printf are buffered and flushed
 * automatically before the next read from the socket, i.e. once every
 * line already received has been handled: RFC 2920 (PIPELINING) asks a
 * server to flush before it would block, and replies to commands that
 * arrived together still leave in one packet. */
#ifndef ODMR_IO_H
#define ODMR_IO_H

#include <stdbool.h>

#include "util.h"
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <openssl/ssl.h>

#define IO_BUFSIZE 16384

enum io_status {
    IO_OK = 0,
    IO_EOF = -1,      /* peer closed the connection */
    IO_TIMEOUT = -2,  /* no progress within timeout_ms */
    IO_ERROR = -3,    /* socket or TLS error */
    IO_TOOLONG = -4,  /* line longer than the caller's maximum */
    IO_DEADLINE = -5, /* a line or a phase took longer than its deadline */
};

struct io {
    int fd;
    SSL *ssl;
    int timeout_ms;
    int line_deadline_ms;    /* 0: none; see io_set_line_deadline */
    int64_t deadline;        /* io_clock_ms() time, 0: none; io_set_deadline */
    enum io_status status;   /* last failure, IO_OK otherwise */
    char rbuf[IO_BUFSIZE];
    size_t rpos, rlen;
    char wbuf[IO_BUFSIZE];
    size_t wlen;
    unsigned long long bytes_in, bytes_out;
    /* Optional trace hook (-d / -vv): called with each line read/written. */
    void (*trace)(void *ctx, bool out, const char *data, size_t len);
    void *trace_ctx;
};

/* Takes ownership of fd and makes it non-blocking. */
void io_init(struct io *io, int fd, int timeout_ms);
/* Once the first byte of a line has arrived, io_getline returns
 * IO_DEADLINE unless the whole line is in within ms (0: no limit).  The wait
 * for that first byte is bounded by timeout_ms alone: a slow line is a
 * trickling peer, a late one merely an idle peer. */
void io_set_line_deadline(struct io *io, int ms);
/* No wait, read or write, goes past `when` (an io_clock_ms() value; 0
 * removes the deadline); one that would fails with IO_DEADLINE.  For
 * limits on a whole phase such as DATA. */
void io_set_deadline(struct io *io, int64_t when);
/* Brings the deadline forward to one timeout from now, unless a sooner
 * one is set: for the rest of a multi-line reply once its first line is
 * in (a peer sending one line per timeout would hold the session for
 * hours).  The caller puts back what it had with io_set_deadline. */
void io_deadline_within_timeout(struct io *io);
/* Milliseconds on CLOCK_MONOTONIC, the clock of io_set_deadline. */
int64_t io_clock_ms(void);

/* Shuts TLS down (best effort) and closes the socket. */
void io_close(struct io *io);

/* Reads one line terminated by LF.  The terminator (CRLF or LF) is removed
 * and *bare_lf set when the line ended in LF without CR.  On a line longer
 * than max-1, the rest of it is consumed and IO_TOOLONG returned.
 * Returns the line length (>= 0) or an io_status (< 0). */
long io_getline(struct io *io, char *buf, size_t max, bool *bare_lf);

/* Reads up to max bytes but stops after the first LF: a "line segment".
 * *complete tells whether the segment ends with LF.  Used for message data,
 * where lines may be arbitrarily long and must be streamed.  Returns the
 * number of bytes (> 0) or an io_status (< 0). */
long io_getseg(struct io *io, char *buf, size_t max, bool *complete);

/* Bytes already read from the socket but not yet consumed by the caller
 * (at least 1 while TLS records read ahead wait to be decrypted): not
 * zero whenever input is there without asking the kernel, which is what
 * a wait on the socket itself (linger) must test first.  A server must
 * refuse STARTTLS when this is not zero (plaintext command injection). */
size_t io_pending(const struct io *io);

bool io_write(struct io *io, const void *data, size_t len);
bool io_puts(struct io *io, const char *s);
bool io_printf(struct io *io, const char *fmt, ...)
    PRINTF_LIKE(2, 3);
bool io_flush(struct io *io);

/* STARTTLS. The server side needs an SSL_CTX from tls_server_ctx(); the
 * client verifies the certificate chain and, when host is not NULL, that
 * the certificate names host. err receives a one-line reason on failure. */
bool io_starttls_server(struct io *io, SSL_CTX *ctx, char *err, size_t n);
bool io_starttls_client(struct io *io, SSL_CTX *ctx, const char *host,
                        char *err, size_t n);
/* The same, offering resume (may be NULL) for an abbreviated handshake;
 * the server may still choose a full one.  A resumed session passes only
 * if it was verified when it was made and its certificate names host. */
bool io_starttls_client_resume(struct io *io, SSL_CTX *ctx, const char *host,
                               SSL_SESSION *resume, char *err, size_t n);
/* Whether the TLS session in use was resumed rather than newly made. */
bool io_tls_resumed(const struct io *io);
/* "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)", or "" */
void io_tls_info(const struct io *io, char *buf, size_t n);

/* TLS 1.2 minimum contexts. Return NULL with a reason in err.  Server
 * contexts issue session tickets (common/tls_ticket.h). */
SSL_CTX *tls_server_ctx(const char *cert_file, const char *key_file,
                        char *err, size_t n);
SSL_CTX *tls_client_ctx(const char *ca_file, char *err, size_t n);

#endif
