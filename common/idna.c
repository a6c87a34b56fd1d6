/* idna.c - domain keys through libidn2 (guarantees in idna.h). */
#include "idna.h"

#include <idn2.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "util.h"

#define LABEL_MAX 63
/* IDNA2008 lookup with the UTS #46 mapping that folds case and width;
 * non-transitional, so that "ß" and ZWJ/ZWNJ keep their IDNA2008 meaning. */
#define LOOKUP_FLAGS (IDN2_NFC_INPUT | IDN2_NONTRANSITIONAL)

static bool ascii_only(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80)
            return false;
    return true;
}

static bool ldh_label(const char *s, size_t n)
{
    if (n == 0 || n > LABEL_MAX || s[0] == '-' || s[n - 1] == '-')
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-'))
            return false;
    }
    return true;
}

static bool ldh_domain(const char *s)
{
    for (const char *dot; ; s = dot + 1) {
        dot = strchr(s, '.');
        if (!ldh_label(s, dot ? (size_t)(dot - s) : strlen(s)))
            return false;
        if (!dot)
            return true;
    }
}

/* The A-label libidn2 gives for text (a label or a domain), into out. */
static enum idna_result lookup(const char *text, char *out, size_t n,
                               const char **why)
{
    char *a = NULL;
    int rc = idn2_lookup_u8((const uint8_t *)text, (uint8_t **)&a, LOOKUP_FLAGS);
    if (rc != IDN2_OK) {
        *why = idn2_strerror(rc);
        return rc == IDN2_TOO_BIG_LABEL || rc == IDN2_TOO_BIG_DOMAIN ||
                       rc == IDN2_PUNYCODE_BIG_OUTPUT
                   ? IDNA_TOOLONG : IDNA_INVALID;
    }
    bool fits = str_copy(out, a, n);
    idn2_free(a);
    if (!fits) {
        *why = "domain too long";
        return IDNA_TOOLONG;
    }
    return IDNA_OK;
}

/* An "xn--" label is valid only if it decodes and the decoded U-label
 * encodes back to the very same A-label (RFC 5891 5.4). */
static enum idna_result check_alabel(const char *label, const char **why)
{
    char *u = NULL, back[LABEL_MAX + 1];
    if (idn2_to_unicode_8z8z(label, &u, 0) != IDN2_OK || !u || !*u) {
        idn2_free(u);
        *why = "invalid A-label";
        return IDNA_INVALID;
    }
    enum idna_result r = lookup(u, back, sizeof back, why);
    idn2_free(u);
    if (r == IDNA_OK && strcmp(back, label)) {
        *why = "A-label is not in canonical form";
        r = IDNA_INVALID;
    }
    return r;
}

/* The key of one label (n octets at s), appended to out at *len. */
static enum idna_result label_key(const char *s, size_t n, char *out,
                                  size_t room, size_t *len, const char **why)
{
    char label[ADDR_DOMAIN_MAX + 1], key[ADDR_DOMAIN_MAX + 1];
    enum idna_result r = IDNA_OK;
    if (n == 0 || n > ADDR_DOMAIN_MAX) {
        *why = n ? "label too long" : "empty label";
        return n ? IDNA_TOOLONG : IDNA_INVALID;
    }
    memcpy(label, s, n);
    label[n] = '\0';
    if (ascii_only(label, n)) {
        for (size_t i = 0; i < n; i++)
            if (label[i] >= 'A' && label[i] <= 'Z')
                label[i] = (char)(label[i] - 'A' + 'a');
        if (n > LABEL_MAX) {
            *why = "label longer than 63 octets";
            return IDNA_TOOLONG;
        }
        if (!ldh_label(label, n)) {
            *why = "not a letter-digit-hyphen label";
            return IDNA_INVALID;
        }
        if (!strncmp(label, "xn--", 4))
            r = check_alabel(label, why);
        str_copy(key, label, sizeof key);
    } else if ((r = lookup(label, key, sizeof key, why)) == IDNA_OK &&
               !ldh_domain(key)) {
        /* UTS #46 maps some dots (U+3002...) to '.': the result must still
         * be labels we would have accepted */
        *why = "maps to an invalid domain";
        r = IDNA_INVALID;
    }
    if (r != IDNA_OK)
        return r;
    size_t k = strlen(key);
    if (*len + (*len ? 1 : 0) + k >= room || *len + (*len ? 1 : 0) + k > IDNA_KEY_MAX) {
        *why = "domain longer than 255 octets";
        return IDNA_TOOLONG;
    }
    if (*len)
        out[(*len)++] = '.';
    memcpy(out + *len, key, k + 1);
    *len += k;
    return IDNA_OK;
}

enum idna_result idna_domain_key(const char *domain, char *key, size_t n,
                                 const char **why)
{
    const char *ignored;
    if (!why)
        why = &ignored;
    if (!domain || !key || n == 0) {
        *why = "no domain";
        return IDNA_INVALID;
    }
    key[0] = '\0';
    size_t total = strnlen(domain, 4 * ADDR_DOMAIN_MAX + 1);
    if (total > 1 && domain[total - 1] == '.')
        total--;   /* the root: "example.com." is "example.com" */
    if (total == 0 || total > 4 * ADDR_DOMAIN_MAX) {
        *why = total ? "domain too long" : "empty domain";
        return total ? IDNA_TOOLONG : IDNA_INVALID;
    }
    size_t len = 0, start = 0;
    for (size_t i = 0; i <= total; i++) {
        if (i < total && domain[i] != '.')
            continue;
        enum idna_result r = label_key(domain + start, i - start, key, n, &len, why);
        if (r != IDNA_OK) {
            key[0] = '\0';
            return r;
        }
        start = i + 1;
    }
    return IDNA_OK;
}

void idna_display(const char *key, char *buf, size_t n)
{
    char *u = NULL;
    if (!strstr(key, "xn--") || idn2_to_unicode_8z8z(key, &u, 0) != IDN2_OK ||
        !u || !str_copy(buf, u, n))
        str_copy(buf, key, n);
    idn2_free(u);
}
