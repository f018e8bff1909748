/* Just enough CBOR (RFC 8949) for the CoAP device: write a flat map, and
 * read numbers and booleans out of a map with text keys. */
#ifndef KONSUL_CBOR_H
#define KONSUL_CBOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct cbor_writer {
    uint8_t *buf;
    size_t cap, len;
    bool overflow;
};

void cbor_init(struct cbor_writer *w, uint8_t *buf, size_t cap);
void cbor_map(struct cbor_writer *w, uint64_t pairs);
void cbor_text(struct cbor_writer *w, const char *s);
void cbor_uint(struct cbor_writer *w, uint64_t v);
void cbor_int(struct cbor_writer *w, int64_t v);
void cbor_double(struct cbor_writer *w, double v);
void cbor_bool(struct cbor_writer *w, bool v);

/* A value found under a key of a map. */
enum cbor_kind { CBOR_MISSING, CBOR_NUMBER, CBOR_BOOL, CBOR_OTHER };
struct cbor_value {
    enum cbor_kind kind;
    double number;
    bool boolean;
};

/* Looks up `key` in the map `data` holds; false if `data` is no well-formed map. */
bool cbor_map_get(const uint8_t *data, size_t len, const char *key, struct cbor_value *out);

#endif
