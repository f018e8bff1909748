/* Konsul Edge example device over CoAP (UDP), with libcoap 3.
 *
 * Theory of operation:
 *   1. POST /rd?ep=<id>&lt=<lifetime>[&tk=<token>]: registers in the agent's
 *      resource directory (RFC 9176); the agent marks the device online.
 *   2. GET /devices/<id>/desired with Observe: the desired state (a CBOR map)
 *      now and on every change; each one is applied (interval, led) and the
 *      result POSTed to /devices/<id>/reported.
 *   3. Every interval, POST /devices/<id>/telemetry a CBOR map with seq, ts,
 *      temp_c. The agent answers 2.04 only once the sample is durable; until
 *      then the sample stays pending and is sent again unchanged (same seq,
 *      which the agent deduplicates).
 *   4. The registration is refreshed every lifetime/2, and the observation
 *      renewed when its last notification is older than its Max-Age: an
 *      agent that restarted has forgotten both.
 *   5. A request that times out (libcoap's CON retransmissions exhausted)
 *      means the agent is away: start again from 1 after a backoff with jitter.
 *   6. After the wanted samples, DELETE the registration (offline) and exit.
 *
 * Every request carries ep= and tk= in its query: the agent's token check
 * (docs/coap.md). One thread; libcoap's coap_io_process() drives I/O.
 */
#define _POSIX_C_SOURCE 200809L
#include <coap3/coap.h>
#include <netdb.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "cbor.h"
#include "device.h"

#define CLOCK_SET_AFTER 1700000000 /* a clock before late 2023 was never set */

enum request_kind { REQ_REGISTER, REQ_OBSERVE, REQ_TELEMETRY, REQ_REPORTED, REQ_UNREGISTER, REQ_KINDS };

struct device {
    struct device_args args;
    struct device_state state;
    struct seq_counter seq;
    struct backoff backoff;
    coap_session_t *session;
    /* One outstanding request of each kind, known by its token. */
    uint8_t token[REQ_KINDS][8];
    size_t token_len[REQ_KINDS];
    bool waiting[REQ_KINDS];
    bool registered;
    double registered_at, retry_at;
    double observe_fresh_until; /* renew the observation when its last notification went stale */
    char location[128]; /* the registration's Location-Path */
    bool report_due;
    uint8_t sample[128]; /* the pending sample, sent until acknowledged */
    size_t sample_len;
    double last_sample;
    long acked;
    bool unregistered;
};

static struct device dev;
static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

/* Adds "/"-separated Uri-Path and "&"-separated Uri-Query options. */
static void add_uri(coap_optlist_t **opts, const char *path, const char *query)
{
    char buf[512];
    struct { const char *text; uint16_t option; char sep; } parts[] = {
        {path, COAP_OPTION_URI_PATH, '/'}, {query, COAP_OPTION_URI_QUERY, '&'}};
    for (size_t p = 0; p < 2; p++) {
        if (!parts[p].text)
            continue;
        snprintf(buf, sizeof buf, "%s", parts[p].text);
        char sep[2] = {parts[p].sep, '\0'};
        char *save = NULL;
        for (char *seg = strtok_r(buf, sep, &save); seg; seg = strtok_r(NULL, sep, &save))
            coap_insert_optlist(opts, coap_new_optlist(parts[p].option, strlen(seg), (const uint8_t *)seg));
    }
}

static void credentials(char *query, size_t size, const char *extra)
{
    int n = snprintf(query, size, "ep=%s", dev.args.id);
    if (dev.args.token)
        n += snprintf(query + n, size - (size_t)n, "&tk=%s", dev.args.token);
    if (extra)
        snprintf(query + n, size - (size_t)n, "&%s", extra);
}

/* Sends a CON request; `reuse_token` keeps the kind's token (an observation). */
static bool send_request(enum request_kind kind, coap_pdu_code_t method, const char *path, const char *extra_query,
                         const uint8_t *payload, size_t len, bool observe, bool reuse_token)
{
    coap_pdu_t *pdu = coap_pdu_init(COAP_MESSAGE_CON, method, coap_new_message_id(dev.session),
                                    coap_session_max_pdu_size(dev.session));
    if (!pdu)
        return false;
    if (!reuse_token || dev.token_len[kind] == 0)
        coap_session_new_token(dev.session, &dev.token_len[kind], dev.token[kind]);
    coap_add_token(pdu, dev.token_len[kind], dev.token[kind]);

    coap_optlist_t *opts = NULL;
    uint8_t buf[4];
    char query[384];
    credentials(query, sizeof query, extra_query);
    if (observe)
        coap_insert_optlist(&opts, coap_new_optlist(COAP_OPTION_OBSERVE,
                                                    coap_encode_var_safe(buf, sizeof buf, COAP_OBSERVE_ESTABLISH), buf));
    add_uri(&opts, path, query);
    if (payload)
        coap_insert_optlist(&opts, coap_new_optlist(COAP_OPTION_CONTENT_FORMAT,
                                                    coap_encode_var_safe(buf, sizeof buf, COAP_MEDIATYPE_APPLICATION_CBOR), buf));
    else if (method == COAP_REQUEST_CODE_GET)
        coap_insert_optlist(&opts, coap_new_optlist(COAP_OPTION_ACCEPT,
                                                    coap_encode_var_safe(buf, sizeof buf, COAP_MEDIATYPE_APPLICATION_CBOR), buf));
    coap_add_optlist_pdu(pdu, &opts);
    coap_delete_optlist(opts);
    if (payload)
        coap_add_data(pdu, len, payload);
    if (coap_send(dev.session, pdu) == COAP_INVALID_MID)
        return false;
    dev.waiting[kind] = true;
    return true;
}

static void device_path(char *out, size_t size, const char *leaf)
{
    snprintf(out, size, "devices/%s/%s", dev.args.id, leaf);
}

static void send_register(void)
{
    char extra[32];
    snprintf(extra, sizeof extra, "lt=%u", dev.args.lifetime);
    send_request(REQ_REGISTER, COAP_REQUEST_CODE_POST, "rd", extra, NULL, 0, false, false);
}

static void send_observe(void)
{
    char path[256];
    device_path(path, sizeof path, "desired");
    send_request(REQ_OBSERVE, COAP_REQUEST_CODE_GET, path, NULL, NULL, 0, true, true);
}

static void send_reported(void)
{
    uint8_t body[96];
    struct cbor_writer w;
    char path[256];
    cbor_init(&w, body, sizeof body);
    cbor_map(&w, 3);
    cbor_text(&w, "interval");
    if (dev.state.interval == (double)(int64_t)dev.state.interval)
        cbor_int(&w, (int64_t)dev.state.interval);
    else
        cbor_double(&w, dev.state.interval);
    cbor_text(&w, "led");
    cbor_bool(&w, dev.state.led);
    cbor_text(&w, "firmware");
    cbor_text(&w, FIRMWARE_VERSION);
    device_path(path, sizeof path, "reported");
    if (send_request(REQ_REPORTED, COAP_REQUEST_CODE_POST, path, NULL, body, w.len, false, false))
        dev.report_due = false;
}

static void make_sample(void)
{
    struct cbor_writer w;
    bool clock_set = unix_s() >= CLOCK_SET_AFTER;
    cbor_init(&w, dev.sample, sizeof dev.sample);
    cbor_map(&w, clock_set ? 3 : 2);
    cbor_text(&w, "seq");
    cbor_uint(&w, seq_next(&dev.seq));
    cbor_text(&w, "temp_c");
    cbor_double(&w, read_temperature_c());
    if (clock_set) {
        cbor_text(&w, "ts");
        cbor_int(&w, unix_s());
    }
    dev.sample_len = w.len;
}

static void send_sample(void)
{
    char path[256];
    device_path(path, sizeof path, "telemetry");
    send_request(REQ_TELEMETRY, COAP_REQUEST_CODE_POST, path, NULL, dev.sample, dev.sample_len, false, false);
}

static int kind_of(coap_bin_const_t token)
{
    for (int k = 0; k < REQ_KINDS; k++)
        if (dev.token_len[k] == token.length && memcmp(dev.token[k], token.s, token.length) == 0)
            return k;
    return -1;
}

static void apply_desired(const coap_pdu_t *received)
{
    size_t len;
    const uint8_t *data;
    struct cbor_value interval, led;
    if (!coap_get_data(received, &len, &data) || !cbor_map_get(data, len, "interval", &interval) ||
        !cbor_map_get(data, len, "led", &led)) {
        fprintf(stderr, "desired state is not a CBOR map, ignored\n");
        return;
    }
    if (device_apply(&dev.state, &dev.args, interval.kind == CBOR_NUMBER, interval.number, led.kind == CBOR_BOOL,
                     led.boolean))
        dev.report_due = true;
}

/* RFC 7641 3.3.1: a notification is fresh for its Max-Age (60 s if absent);
 * after that the client asks again. This is also how the device notices an
 * agent that restarted and forgot the observation. */
static double max_age(const coap_pdu_t *received)
{
    coap_opt_iterator_t it;
    coap_opt_t *opt = coap_check_option(received, COAP_OPTION_MAXAGE, &it);
    return opt ? (double)coap_decode_var_bytes(coap_opt_value(opt), coap_opt_length(opt)) : 60.0;
}

static void keep_location(const coap_pdu_t *received)
{
    coap_opt_iterator_t it;
    coap_opt_t *opt;
    size_t n = 0;
    coap_option_iterator_init(received, &it, COAP_OPT_ALL);
    while ((opt = coap_option_next(&it)) && n < sizeof dev.location - 1) {
        if (it.number != COAP_OPTION_LOCATION_PATH)
            continue;
        n += (size_t)snprintf(dev.location + n, sizeof dev.location - n, "%s%.*s", n ? "/" : "",
                              (int)coap_opt_length(opt), (const char *)coap_opt_value(opt));
    }
}

static coap_response_t on_response(coap_session_t *session, const coap_pdu_t *sent, const coap_pdu_t *received,
                                   const coap_mid_t mid)
{
    (void)session, (void)sent, (void)mid;
    int kind = kind_of(coap_pdu_get_token(received));
    coap_pdu_code_t code = coap_pdu_get_code(received);
    bool ok = COAP_RESPONSE_CLASS(code) == 2;
    if (kind < 0)
        return COAP_RESPONSE_FAIL; /* an answer to nothing we asked: RST it */
    dev.waiting[kind] = false;
    if (!ok) {
        size_t len = 0;
        const uint8_t *data = NULL;
        coap_get_data(received, &len, &data);
        fprintf(stderr, "request %d answered %d.%02d: %.*s\n", kind, COAP_RESPONSE_CLASS(code), code & 0x1f,
                (int)len, data ? (const char *)data : "");
    }
    switch (kind) {
    case REQ_REGISTER:
        if (ok) {
            keep_location(received);
            if (!dev.registered)
                printf("registered at %s:%d as %s (%s)\n", dev.args.host, dev.args.port, dev.args.id, dev.location);
            fflush(stdout);
            dev.registered = true;
            dev.registered_at = monotonic_s();
            dev.backoff.attempt = 0;
            send_observe();
            dev.report_due = true;
        } else {
            dev.retry_at = monotonic_s() + backoff_next_s(&dev.backoff);
        }
        break;
    case REQ_OBSERVE:
        if (ok) {
            apply_desired(received);
            dev.observe_fresh_until = monotonic_s() + max_age(received) + 5;
        }
        break;
    case REQ_TELEMETRY:
        if (ok) {
            dev.acked++;
            dev.sample_len = 0;
        } else if (COAP_RESPONSE_CLASS(code) == 4) {
            dev.sample_len = 0; /* refused: resending the same sample would not help */
        }
        break;
    case REQ_UNREGISTER:
        dev.unregistered = true;
        break;
    default:
        break;
    }
    return COAP_RESPONSE_OK;
}

static void on_nack(coap_session_t *session, const coap_pdu_t *sent, const coap_nack_reason_t reason,
                    const coap_mid_t mid)
{
    (void)session, (void)mid;
    int kind = sent ? kind_of(coap_pdu_get_token(sent)) : -1;
    if (kind >= 0)
        dev.waiting[kind] = false;
    if (kind == REQ_UNREGISTER) {
        dev.unregistered = true;
        return;
    }
    /* The agent is away: start again (register, observe) after a pause. */
    double pause = backoff_next_s(&dev.backoff);
    fprintf(stderr, "no answer from the agent (reason %d), trying again in %.1f s\n", (int)reason, pause);
    dev.registered = false;
    dev.retry_at = monotonic_s() + pause;
}

static coap_session_t *open_session(coap_context_t *ctx)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_DGRAM}, *res;
    if (getaddrinfo(dev.args.host, NULL, &hints, &res) != 0) {
        fprintf(stderr, "cannot resolve %s\n", dev.args.host);
        return NULL;
    }
    coap_address_t dst;
    coap_address_init(&dst);
    memcpy(&dst.addr, res->ai_addr, res->ai_addrlen);
    dst.size = res->ai_addrlen;
    freeaddrinfo(res);
    coap_address_set_port(&dst, (uint16_t)dev.args.port);
    return coap_new_client_session(ctx, NULL, &dst, COAP_PROTO_UDP);
}

static void step(double now)
{
    if (!dev.registered) {
        if (!dev.waiting[REQ_REGISTER] && now >= dev.retry_at)
            send_register();
        return;
    }
    if (now - dev.registered_at >= dev.args.lifetime / 2.0 && !dev.waiting[REQ_REGISTER])
        send_register(); /* refresh; its answer renews the observation */
    if (now >= dev.observe_fresh_until && !dev.waiting[REQ_OBSERVE] && !dev.waiting[REQ_REGISTER]) {
        dev.observe_fresh_until = now + 60; /* until its answer sets it */
        send_observe();
    }
    if (dev.report_due && !dev.waiting[REQ_REPORTED])
        send_reported();
    if (dev.sample_len == 0 && now - dev.last_sample >= dev.state.interval) {
        dev.last_sample = now;
        make_sample();
    }
    if (dev.sample_len && !dev.waiting[REQ_TELEMETRY])
        send_sample();
}

int main(int argc, char **argv)
{
    if (!device_parse_args(argc, argv, 5683, &dev.args))
        return 2;
    dev.state.interval = dev.args.interval;
    dev.backoff = (struct backoff){.first_s = 0.5, .cap_s = 30};
    dev.last_sample = -1e9;
    if (!seq_init(&dev.seq, dev.args.state_file))
        return 1;
    srand((unsigned)time(NULL) ^ (unsigned)dev.seq.epoch);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);

    coap_startup();
    coap_set_log_level(LOG_ERR);
    coap_context_t *ctx = coap_new_context(NULL);
    if (!ctx || !(dev.session = open_session(ctx))) {
        fprintf(stderr, "cannot open a CoAP session to %s:%d\n", dev.args.host, dev.args.port);
        return 1;
    }
    coap_register_response_handler(ctx, on_response);
    coap_register_nack_handler(ctx, on_nack);

    while (!stop_requested && (dev.args.samples == 0 || dev.acked < dev.args.samples)) {
        step(monotonic_s());
        coap_io_process(ctx, 50);
    }
    if (dev.registered && dev.location[0]) {
        send_request(REQ_UNREGISTER, COAP_REQUEST_CODE_DELETE, dev.location, NULL, NULL, 0, false, false);
        double deadline = monotonic_s() + 5;
        while (!dev.unregistered && monotonic_s() < deadline)
            coap_io_process(ctx, 50);
    }
    printf("done after %ld samples\n", dev.acked);
    coap_session_release(dev.session);
    coap_free_context(ctx);
    coap_cleanup();
    return dev.args.samples == 0 || dev.acked >= dev.args.samples ? 0 : 1;
}
