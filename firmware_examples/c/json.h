/* Just enough JSON for the MQTT device: read a number or a boolean stored
 * under a key of a top-level object, skipping everything else. */
#ifndef KONSUL_JSON_H
#define KONSUL_JSON_H

#include <stdbool.h>
#include <stddef.h>

enum json_kind { JSON_MISSING, JSON_NUMBER, JSON_BOOL, JSON_OTHER };
struct json_value {
    enum json_kind kind;
    double number;
    bool boolean;
};

/* Looks up `key` in the object `text` holds; false if it is no JSON object. */
bool json_object_get(const char *text, size_t len, const char *key, struct json_value *out);

#endif
