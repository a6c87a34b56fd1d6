/* fuzz_qfile.c - libFuzzer harness for server/qfile.c, the one-file
 * message's trailer and embedded envelope (make fuzz).  The input is a
 * whole queue file.
 *
 * Properties checked on every input: no crash or sanitizer report; an
 * accepted trailer's lengths add up to the input's size exactly and the
 * envelope is within QFILE_ENVELOPE_MAX; an accepted envelope names the
 * data's length as its size, has an id and a domain, and ended with its
 * end marker. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* qfile.c and envelope.c belong to odmrd, not to the common sources the
 * fuzz rule links: compiled in here. */
#include "../../server/envelope.c"
#include "../../server/qfile.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *file = (const char *)data;
    uint64_t data_len, env_len;
    char err[256];
    if (!qfile_parse_trailer(file, size, size, &data_len, &env_len, err, sizeof err))
        return 0;
    if (data_len + env_len + QFILE_TRAILER_LEN != size || env_len > QFILE_ENVELOPE_MAX)
        abort();
    struct envelope e;
    if (!qfile_parse_envelope(file + data_len, (size_t)env_len, data_len, &e, err,
                              sizeof err))
        return 0;
    if (e.size != data_len || !e.id[0] || !e.domain[0] ||
        memcmp(file + data_len + env_len - 2, ".\n", 2))
        abort();
    envelope_free(&e);
    return 0;
}
