/* fuzz_idna.c - libFuzzer harness for common/idna.c (make fuzz).
 *
 * Properties checked on every input: no crash or sanitizer report; a key
 * is a safe file name (lower-case LDH and dots, 1..IDNA_KEY_MAX octets,
 * no leading dot, no empty label) and is its own key; the readable form of
 * a key maps back to the same key. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/idna.h"

static int safe_key(const char *k)
{
    size_t n = strlen(k);
    if (n == 0 || n > IDNA_KEY_MAX || k[0] == '.' || k[n - 1] == '.' ||
        strstr(k, ".."))
        return 0;
    for (; *k; k++)
        if (!((*k >= 'a' && *k <= 'z') || (*k >= '0' && *k <= '9') ||
              *k == '-' || *k == '.'))
            return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char in[1100], key[IDNA_KEY_MAX + 1], again[IDNA_KEY_MAX + 1];
    char shown[4 * IDNA_KEY_MAX + 1];
    if (size >= sizeof in)
        return 0;
    memcpy(in, data, size);
    in[size] = '\0';
    if (idna_domain_key(in, key, sizeof key, NULL) != IDNA_OK)
        return 0;
    if (!safe_key(key))
        abort();
    if (idna_domain_key(key, again, sizeof again, NULL) != IDNA_OK ||
        strcmp(again, key))
        abort();
    idna_display(key, shown, sizeof shown);
    if (idna_domain_key(shown, again, sizeof again, NULL) != IDNA_OK ||
        strcmp(again, key))
        abort();
    return 0;
}
