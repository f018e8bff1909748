/* What both example devices share: arguments, seq numbers, the sensor, the
 * LED, clocks and reconnect backoff. Protocol code lives in coap_device.c and
 * mqtt_device.c. */
#ifndef KONSUL_DEVICE_H
#define KONSUL_DEVICE_H

#include <stdbool.h>
#include <stdint.h>

#define FIRMWARE_VERSION "1.0.0"
#define SEQ_BITS 20
#define MIN_INTERVAL 0.1 /* seconds; a desired interval below this is ignored */

struct device_args {
    const char *host;
    int port;
    const char *id;
    const char *token;      /* NULL: anonymous (agent runs --allow-anonymous) */
    long samples;           /* stop after this many acknowledged samples; 0: never */
    double interval;        /* seconds between samples until desired says otherwise */
    const char *state_file; /* keeps the boot epoch behind seq */
    const char *led_path;   /* a sysfs LED brightness file, or NULL to only print */
    unsigned lifetime;      /* CoAP registration lifetime (s) */
};

/* Parses the command line; prints usage and returns false on a mistake. */
bool device_parse_args(int argc, char **argv, int default_port, struct device_args *args);

/* seq = epoch << SEQ_BITS | n: unique across reboots without a clock,
 * as long as the state file is kept (see README.md). */
struct seq_counter {
    const char *path;
    uint64_t epoch;
    uint64_t count;
};
bool seq_init(struct seq_counter *seq, const char *path);
uint64_t seq_next(struct seq_counter *seq);

/* The desired state the device applies and reports. */
struct device_state {
    double interval;
    bool led;
};
/* Applies the given fields (has_* false: leave as is); true if the state changed. */
bool device_apply(struct device_state *state, const struct device_args *args,
                  bool has_interval, double interval, bool has_led, bool led);

double read_temperature_c(void);
double monotonic_s(void);
int64_t unix_s(void);

/* Exponential backoff with equal jitter. */
struct backoff {
    double first_s, cap_s;
    unsigned attempt;
};
double backoff_next_s(struct backoff *b);
void sleep_s(double seconds);

#endif
