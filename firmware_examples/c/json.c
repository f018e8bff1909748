#include "json.h"

#include <stdlib.h>
#include <string.h>

struct scan {
    const char *p, *end;
};

static void ws(struct scan *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

/* Skips a string (at its opening quote); its raw contents in [*start, *stop). */
static bool string(struct scan *s, const char **start, const char **stop)
{
    if (s->p >= s->end || *s->p != '"')
        return false;
    *start = ++s->p;
    while (s->p < s->end && *s->p != '"')
        s->p += *s->p == '\\' ? 2 : 1;
    if (s->p >= s->end)
        return false;
    *stop = s->p++;
    return true;
}

static bool literal(struct scan *s, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0)
        return false;
    s->p += n;
    return true;
}

static bool value(struct scan *s, struct json_value *out, int depth)
{
    const char *a, *b;
    ws(s);
    if (s->p >= s->end || depth > 32)
        return false;
    out->kind = JSON_OTHER;
    switch (*s->p) {
    case '"': return string(s, &a, &b);
    case 't': out->kind = JSON_BOOL; out->boolean = true; return literal(s, "true");
    case 'f': out->kind = JSON_BOOL; out->boolean = false; return literal(s, "false");
    case 'n': return literal(s, "null");
    case '{':
    case '[': {
        char close = *s->p == '{' ? '}' : ']';
        bool object = close == '}';
        s->p++;
        ws(s);
        if (s->p < s->end && *s->p == close) {
            s->p++;
            return true;
        }
        for (;;) {
            struct json_value ignored;
            if (object) {
                ws(s);
                if (!string(s, &a, &b))
                    return false;
                ws(s);
                if (s->p >= s->end || *s->p++ != ':')
                    return false;
            }
            if (!value(s, &ignored, depth + 1))
                return false;
            ws(s);
            if (s->p >= s->end)
                return false;
            if (*s->p == close) {
                s->p++;
                return true;
            }
            if (*s->p++ != ',')
                return false;
        }
    }
    default: {
        /* strtod needs a terminated string: copy the number's characters. */
        char buf[64];
        size_t n = 0;
        while (s->p + n < s->end && n < sizeof buf - 1 && strchr("+-0123456789.eE", s->p[n]))
            n++;
        if (n == 0)
            return false;
        memcpy(buf, s->p, n);
        buf[n] = '\0';
        char *stop;
        out->number = strtod(buf, &stop);
        if ((size_t)(stop - buf) != n)
            return false;
        out->kind = JSON_NUMBER;
        s->p += n;
        return true;
    }
    }
}

bool json_object_get(const char *text, size_t len, const char *key, struct json_value *out)
{
    struct scan s = {text, text + len};
    out->kind = JSON_MISSING;
    ws(&s);
    if (s.p >= s.end || *s.p++ != '{')
        return false;
    ws(&s);
    if (s.p < s.end && *s.p == '}')
        return true;
    for (;;) {
        const char *a, *b;
        struct json_value v;
        ws(&s);
        if (!string(&s, &a, &b))
            return false;
        ws(&s);
        if (s.p >= s.end || *s.p++ != ':' || !value(&s, &v, 1))
            return false;
        if ((size_t)(b - a) == strlen(key) && memcmp(a, key, (size_t)(b - a)) == 0)
            *out = v;
        ws(&s);
        if (s.p >= s.end)
            return false;
        if (*s.p == '}')
            return true;
        if (*s.p++ != ',')
            return false;
    }
}
