#include "cbor.h"

#include <math.h>
#include <string.h>

void cbor_init(struct cbor_writer *w, uint8_t *buf, size_t cap)
{
    w->buf = buf;
    w->cap = cap;
    w->len = 0;
    w->overflow = false;
}

static void put(struct cbor_writer *w, const void *data, size_t n)
{
    if (w->len + n > w->cap) {
        w->overflow = true;
        return;
    }
    memcpy(w->buf + w->len, data, n);
    w->len += n;
}

/* The head of an item: major type and argument, in the shortest form. */
static void head(struct cbor_writer *w, uint8_t major, uint64_t arg)
{
    uint8_t b[9];
    size_t n;
    if (arg < 24) {
        b[0] = (uint8_t)(major << 5 | arg);
        n = 1;
    } else if (arg <= 0xff) {
        b[0] = (uint8_t)(major << 5 | 24);
        n = 2;
    } else if (arg <= 0xffff) {
        b[0] = (uint8_t)(major << 5 | 25);
        n = 3;
    } else if (arg <= 0xffffffffu) {
        b[0] = (uint8_t)(major << 5 | 26);
        n = 5;
    } else {
        b[0] = (uint8_t)(major << 5 | 27);
        n = 9;
    }
    for (size_t i = 1; i < n; i++)
        b[i] = (uint8_t)(arg >> (8 * (n - 1 - i)));
    put(w, b, n);
}

void cbor_map(struct cbor_writer *w, uint64_t pairs) { head(w, 5, pairs); }
void cbor_uint(struct cbor_writer *w, uint64_t v) { head(w, 0, v); }
void cbor_bool(struct cbor_writer *w, bool v) { put(w, v ? "\xf5" : "\xf4", 1); }

void cbor_text(struct cbor_writer *w, const char *s)
{
    size_t n = strlen(s);
    head(w, 3, n);
    put(w, s, n);
}

void cbor_int(struct cbor_writer *w, int64_t v)
{
    if (v >= 0)
        head(w, 0, (uint64_t)v);
    else
        head(w, 1, (uint64_t)(-(v + 1)));
}

void cbor_double(struct cbor_writer *w, double v)
{
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    uint8_t b[9] = {0xfb};
    for (int i = 0; i < 8; i++)
        b[1 + i] = (uint8_t)(bits >> (56 - 8 * i));
    put(w, b, sizeof b);
}

/* ---- reading ---- */

struct reader {
    const uint8_t *p, *end;
};

static bool read_be(struct reader *r, size_t n, uint64_t *out)
{
    if ((size_t)(r->end - r->p) < n)
        return false;
    *out = 0;
    for (size_t i = 0; i < n; i++)
        *out = *out << 8 | *r->p++;
    return true;
}

/* Reads an item's head; `info` is the low 5 bits (for floats and simple values). */
static bool read_head(struct reader *r, uint8_t *major, uint8_t *info, uint64_t *arg)
{
    if (r->p >= r->end)
        return false;
    *major = *r->p >> 5;
    *info = *r->p++ & 0x1f;
    if (*info < 24) {
        *arg = *info;
        return true;
    }
    if (*info > 27)
        return false; /* indefinite lengths: not needed for what the agent sends */
    return read_be(r, (size_t)1 << (*info - 24), arg);
}

static double half_to_double(uint16_t h)
{
    int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    double v = exp == 0 ? ldexp(mant, -24) : exp != 31 ? ldexp(mant + 1024, exp - 25) : mant ? NAN : INFINITY;
    return h & 0x8000 ? -v : v;
}

/* Reads one item; numbers and booleans are returned in `out`, the rest skipped. */
static bool read_item(struct reader *r, struct cbor_value *out, int depth)
{
    uint8_t major, info;
    uint64_t arg;
    if (depth > 16 || !read_head(r, &major, &info, &arg))
        return false;
    out->kind = CBOR_OTHER;
    switch (major) {
    case 0: out->kind = CBOR_NUMBER; out->number = (double)arg; return true;
    case 1: out->kind = CBOR_NUMBER; out->number = -1.0 - (double)arg; return true;
    case 2:
    case 3:
        if ((uint64_t)(r->end - r->p) < arg)
            return false;
        r->p += arg;
        return true;
    case 4:
    case 5: {
        uint64_t items = major == 5 ? arg * 2 : arg;
        struct cbor_value ignored;
        for (uint64_t i = 0; i < items; i++)
            if (!read_item(r, &ignored, depth + 1))
                return false;
        return true;
    }
    case 6: return read_item(r, out, depth + 1); /* a tag: the tagged item counts */
    default:
        if (info == 20 || info == 21) {
            out->kind = CBOR_BOOL;
            out->boolean = info == 21;
        } else if (info == 25) {
            out->kind = CBOR_NUMBER;
            out->number = half_to_double((uint16_t)arg);
        } else if (info == 26) {
            uint32_t bits = (uint32_t)arg;
            float f;
            memcpy(&f, &bits, sizeof f);
            out->kind = CBOR_NUMBER;
            out->number = f;
        } else if (info == 27) {
            memcpy(&out->number, &arg, sizeof out->number);
            out->kind = CBOR_NUMBER;
        }
        return true;
    }
}

bool cbor_map_get(const uint8_t *data, size_t len, const char *key, struct cbor_value *out)
{
    struct reader r = {data, data + len};
    uint8_t major, info;
    uint64_t pairs, klen;
    out->kind = CBOR_MISSING;
    if (!read_head(&r, &major, &info, &pairs) || major != 5)
        return false;
    for (uint64_t i = 0; i < pairs; i++) {
        const uint8_t *k = NULL;
        if (r.p < r.end && *r.p >> 5 == 3) {
            if (!read_head(&r, &major, &info, &klen) || (uint64_t)(r.end - r.p) < klen)
                return false;
            k = r.p;
            r.p += klen;
        } else {
            struct cbor_value ignored;
            if (!read_item(&r, &ignored, 1))
                return false;
        }
        struct cbor_value v;
        if (!read_item(&r, &v, 1))
            return false;
        if (k && klen == strlen(key) && memcmp(k, key, klen) == 0)
            *out = v;
    }
    return true;
}
