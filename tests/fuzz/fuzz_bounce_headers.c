/* fuzz_bounce_headers.c - libFuzzer harness for the header scan of
 * server/bounce.c (make fuzz): a DSN that returns only the headers
 * (RET=HDRS) copies the original message up to its first empty line,
 * and the original is whatever a sender on port 25 wrote.
 *
 * header_end() reads the queue file with pread() in DSN_CHUNK pieces.
 * The input is placed once at the start of a file, once after filler
 * lines that end a few octets before the first chunk boundary, so that
 * an empty line (CRLF, or a bare LF) split between two reads is met.
 * Property: the offset is that of the first empty line, or the data's
 * length when there is none, as a model over the whole input finds. */
#define _GNU_SOURCE   /* memfd_create */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* bounce.c belongs to odmrd, not to the common sources the fuzz rule
 * links: compiled in here. */
#include "../../server/bounce.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* What bounce.c calls outside the header scan, which this harness never
 * reaches: the link needs them. */
enum acct_result accounts_domain_owner(const char *db, const char *domain,
                                       char *account, size_t n)
{
    (void)db, (void)domain, (void)account, (void)n;
    abort();
}
void envelope_init(struct envelope *e) { (void)e; abort(); }
void envelope_free(struct envelope *e) { (void)e; abort(); }
bool envelope_add_rcpt(struct envelope *e, const char *addr, unsigned notify,
                       const char *orcpt, size_t max)
{
    (void)e, (void)addr, (void)notify, (void)orcpt, (void)max;
    abort();
}
bool queue_in_begin(struct queue *q, struct queue_in *in)
{
    (void)q, (void)in;
    abort();
}
void queue_in_write(struct queue_in *in, const void *p, size_t len)
{
    (void)in, (void)p, (void)len;
    abort();
}
int queue_in_commit(struct queue *q, struct queue_in *in,
                    struct envelope **envs, size_t nenv)
{
    (void)q, (void)in, (void)envs, (void)nenv;
    abort();
}
void queue_in_abort(struct queue_in *in) { (void)in; abort(); }

static void must(bool property)
{
    if (!property)
        abort();
}

/* The model: the first line that is empty ("\r\n" or "\n"). */
static size_t model_end(const char *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (i && p[i - 1] != '\n')
            continue;
        if (p[i] == '\n' || (p[i] == '\r' && i + 1 < len && p[i + 1] == '\n'))
            return i;
    }
    return len;
}

static int memory_file(const void *a, size_t alen, const void *b, size_t blen)
{
    int fd = memfd_create("fuzz_bounce_headers", MFD_CLOEXEC);
    if (fd < 0 || write(fd, a, alen) != (ssize_t)alen ||
        write(fd, b, blen) != (ssize_t)blen)
        abort();
    return fd;
}

/* Header lines (no empty one) that end `before` octets short of the
 * first chunk boundary. */
static char *filler(size_t before, size_t *len)
{
    *len = DSN_CHUNK - before;
    char *f = malloc(*len);
    if (!f)
        abort();
    memset(f, 'x', *len);
    for (size_t i = 99; i < *len; i += 100)
        f[i] = '\n';
    f[*len - 1] = '\n';
    f[*len - 2] = '\r';
    return f;
}

static void check_at(const char *pre, size_t plen, const char *in, size_t len,
                     char *chunk)
{
    int fd = memory_file(pre, plen, in, len);
    off_t got = header_end(fd, chunk, (off_t)(plen + len));
    must(got == (off_t)(plen + model_end(in, len)));
    close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char chunk[DSN_CHUNK];
    if (size < 1)
        return 0;
    const char *in = (const char *)data + 1;
    size_t len = size - 1, flen;
    check_at("", 0, in, len, chunk);
    char *f = filler(1 + data[0] % 4, &flen);
    check_at(f, flen, in, len, chunk);
    free(f);
    return 0;
}
