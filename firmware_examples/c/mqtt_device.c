/* Konsul Edge example device over MQTT 3.1.1, with libmosquitto.
 *
 * The same contract as the MicroPython device (../micropython/main.py):
 * client id = user name = device id, password = token; a Last Will of
 * "offline" (retained, QoS 1) on konsul/v1/devices/<id>/status, "online"
 * there after connecting; telemetry as JSON at QoS 1 with "seq" (unique
 * across reboots, see device.h) and "ts"; the desired state (retained JSON)
 * applied and the result published as reported state.
 *
 * One thread: the loop below calls mosquitto_loop() and does its own
 * reconnecting, with exponential backoff and jitter (libmosquitto's own
 * reconnect delay has no jitter). A QoS 1 sample counts as sent when its
 * PUBACK arrives, which the agent sends only once the sample is durable;
 * libmosquitto resends unacknowledged messages after a reconnect, and the
 * agent drops a duplicate by its seq.
 */
#define _POSIX_C_SOURCE 200809L
#include <mosquitto.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "device.h"
#include "json.h"

#define CLOCK_SET_AFTER 1700000000 /* a clock before late 2023 was never set */

struct device {
    struct device_args args;
    struct device_state state;
    struct seq_counter seq;
    char topic_status[256], topic_telemetry[256], topic_reported[256], topic_desired[256];
    bool connected;
    bool report_due;    /* reported state to publish at the next chance */
    int telemetry_mid;  /* the sample waiting for its PUBACK; 0: none */
    int offline_mid;    /* the goodbye "offline" waiting for its PUBACK */
    bool offline_acked;
    long acked;         /* samples acknowledged */
};

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static void publish_reported(struct mosquitto *mosq, struct device *d)
{
    char body[160];
    int n = snprintf(body, sizeof body, "{\"interval\":%g,\"led\":%s,\"firmware\":\"%s\"}",
                     d->state.interval, d->state.led ? "true" : "false", FIRMWARE_VERSION);
    if (mosquitto_publish(mosq, NULL, d->topic_reported, n, body, 1, false) == MOSQ_ERR_SUCCESS)
        d->report_due = false;
}

static void on_connect(struct mosquitto *mosq, void *obj, int rc)
{
    struct device *d = obj;
    if (rc != 0) {
        fprintf(stderr, "connection refused: %s\n", mosquitto_connack_string(rc));
        return;
    }
    d->connected = true;
    printf("connected to %s:%d as %s\n", d->args.host, d->args.port, d->args.id);
    fflush(stdout);
    mosquitto_publish(mosq, NULL, d->topic_status, 6, "online", 1, true);
    mosquitto_subscribe(mosq, NULL, d->topic_desired, 1);
    d->report_due = true;
}

static void on_disconnect(struct mosquitto *mosq, void *obj, int rc)
{
    struct device *d = obj;
    (void)mosq;
    d->connected = false;
    if (rc != 0)
        fprintf(stderr, "connection lost\n");
}

static void on_message(struct mosquitto *mosq, void *obj, const struct mosquitto_message *msg)
{
    struct device *d = obj;
    (void)mosq;
    if (strcmp(msg->topic, d->topic_desired) != 0 || msg->payloadlen == 0)
        return; /* an empty payload clears desired: nothing to apply */
    struct json_value interval, led;
    if (!json_object_get(msg->payload, (size_t)msg->payloadlen, "interval", &interval) ||
        !json_object_get(msg->payload, (size_t)msg->payloadlen, "led", &led)) {
        fprintf(stderr, "desired state is not a JSON object, ignored\n");
        return;
    }
    if (device_apply(&d->state, &d->args, interval.kind == JSON_NUMBER, interval.number,
                     led.kind == JSON_BOOL, led.boolean))
        d->report_due = true;
}

static void on_publish(struct mosquitto *mosq, void *obj, int mid)
{
    struct device *d = obj;
    (void)mosq;
    if (d->telemetry_mid && mid == d->telemetry_mid) {
        d->telemetry_mid = 0;
        d->acked++;
    } else if (d->offline_mid && mid == d->offline_mid) {
        d->offline_acked = true;
    }
}

static void send_sample(struct mosquitto *mosq, struct device *d)
{
    char body[200];
    int n = snprintf(body, sizeof body, "{\"seq\":%llu,\"temp_c\":%.2f",
                     (unsigned long long)seq_next(&d->seq), read_temperature_c());
    if (unix_s() >= CLOCK_SET_AFTER)
        n += snprintf(body + n, sizeof body - (size_t)n, ",\"ts\":%lld", (long long)unix_s());
    n += snprintf(body + n, sizeof body - (size_t)n, "}");
    /* Once accepted here, libmosquitto owns the message until its PUBACK,
     * across reconnects. */
    if (mosquitto_publish(mosq, &d->telemetry_mid, d->topic_telemetry, n, body, 1, false) != MOSQ_ERR_SUCCESS)
        d->telemetry_mid = 0;
}

/* Runs until the samples are acknowledged (or a signal); returns an exit code. */
static int run(struct mosquitto *mosq, struct device *d)
{
    struct backoff backoff = {.first_s = 0.5, .cap_s = 30};
    double last_sample = -1e9;
    int rc = mosquitto_connect(mosq, d->args.host, d->args.port, 30);
    while (!stop_requested && (d->args.samples == 0 || d->acked < d->args.samples)) {
        if (rc != MOSQ_ERR_SUCCESS) {
            double pause = backoff_next_s(&backoff);
            fprintf(stderr, "no connection (%s), retrying in %.1f s\n", mosquitto_strerror(rc), pause);
            sleep_s(pause);
            rc = mosquitto_reconnect(mosq);
            continue;
        }
        rc = mosquitto_loop(mosq, 50, 1);
        if (rc != MOSQ_ERR_SUCCESS || !d->connected)
            continue;
        backoff.attempt = 0;
        if (d->report_due)
            publish_reported(mosq, d);
        double now = monotonic_s();
        if (!d->telemetry_mid && now - last_sample >= d->state.interval) {
            last_sample = now;
            send_sample(mosq, d);
        }
    }
    /* A clean DISCONNECT suppresses the Will: say offline ourselves, and
     * wait (a little) for the agent to take it. */
    if (d->connected) {
        mosquitto_publish(mosq, &d->offline_mid, d->topic_status, 7, "offline", 1, true);
        double deadline = monotonic_s() + 5;
        while (!d->offline_acked && monotonic_s() < deadline && mosquitto_loop(mosq, 50, 1) == MOSQ_ERR_SUCCESS)
            ;
        mosquitto_disconnect(mosq);
    }
    printf("done after %ld samples\n", d->acked);
    return d->args.samples == 0 || d->acked >= d->args.samples ? 0 : 1;
}

int main(int argc, char **argv)
{
    static struct device d;
    if (!device_parse_args(argc, argv, 1883, &d.args))
        return 2;
    d.state.interval = d.args.interval;
    if (!seq_init(&d.seq, d.args.state_file))
        return 1;
    srand((unsigned)time(NULL) ^ (unsigned)d.seq.epoch);
    snprintf(d.topic_status, sizeof d.topic_status, "konsul/v1/devices/%s/status", d.args.id);
    snprintf(d.topic_telemetry, sizeof d.topic_telemetry, "konsul/v1/devices/%s/telemetry", d.args.id);
    snprintf(d.topic_reported, sizeof d.topic_reported, "konsul/v1/devices/%s/reported", d.args.id);
    snprintf(d.topic_desired, sizeof d.topic_desired, "konsul/v1/devices/%s/desired", d.args.id);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);

    mosquitto_lib_init();
    struct mosquitto *mosq = mosquitto_new(d.args.id, true, &d);
    if (!mosq) {
        fprintf(stderr, "mosquitto_new failed\n");
        return 1;
    }
    if (d.args.token)
        mosquitto_username_pw_set(mosq, d.args.id, d.args.token);
    mosquitto_will_set(mosq, d.topic_status, 7, "offline", 1, true);
    mosquitto_connect_callback_set(mosq, on_connect);
    mosquitto_disconnect_callback_set(mosq, on_disconnect);
    mosquitto_message_callback_set(mosq, on_message);
    mosquitto_publish_callback_set(mosq, on_publish);

    int code = run(mosq, &d);
    mosquitto_destroy(mosq);
    mosquitto_lib_cleanup();
    return code;
}
