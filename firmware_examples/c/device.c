#define _POSIX_C_SOURCE 200809L
#include "device.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void usage(const char *prog, int default_port)
{
    fprintf(stderr,
            "usage: %s -d DEVICE_ID [-k TOKEN] [-h HOST] [-p PORT] [-n SAMPLES] [-t INTERVAL]\n"
            "          [-s STATE_FILE] [-L LED_BRIGHTNESS_FILE] [-l LIFETIME]\n"
            "  -h  agent host (127.0.0.1)          -p  agent port (%d)\n"
            "  -d  device id                        -k  device token (none: anonymous)\n"
            "  -n  stop after N acknowledged samples (0: run for ever)\n"
            "  -t  seconds between samples (10)     -s  seq state file (konsul_seq_<id>)\n"
            "  -L  file to write the LED state to (e.g. /sys/class/leds/led0/brightness)\n"
            "  -l  CoAP registration lifetime in seconds (300)\n",
            prog, default_port);
}

bool device_parse_args(int argc, char **argv, int default_port, struct device_args *a)
{
    static char state_default[256];
    memset(a, 0, sizeof *a);
    a->host = "127.0.0.1";
    a->port = default_port;
    a->interval = 10;
    a->lifetime = 300;
    int opt;
    while ((opt = getopt(argc, argv, "h:p:d:k:n:t:s:L:l:")) != -1) {
        switch (opt) {
        case 'h': a->host = optarg; break;
        case 'p': a->port = atoi(optarg); break;
        case 'd': a->id = optarg; break;
        case 'k': a->token = *optarg ? optarg : NULL; break;
        case 'n': a->samples = atol(optarg); break;
        case 't': a->interval = atof(optarg); break;
        case 's': a->state_file = optarg; break;
        case 'L': a->led_path = optarg; break;
        case 'l': a->lifetime = (unsigned)strtoul(optarg, NULL, 10); break;
        default: usage(argv[0], default_port); return false;
        }
    }
    if (!a->id || a->port <= 0 || a->port > 65535 || a->interval < MIN_INTERVAL || a->samples < 0) {
        usage(argv[0], default_port);
        return false;
    }
    if (!a->state_file) {
        snprintf(state_default, sizeof state_default, "konsul_seq_%s", a->id);
        a->state_file = state_default;
    }
    return true;
}

static bool seq_advance(struct seq_counter *seq)
{
    unsigned long long epoch = 0;
    FILE *f = fopen(seq->path, "r");
    if (f) {
        if (fscanf(f, "%llu", &epoch) != 1)
            epoch = 0;
        fclose(f);
    }
    seq->epoch = epoch + 1;
    seq->count = 0;
    /* Written and synced before the epoch's first sample goes out, and
     * replaced whole, so that a power cut never lets an epoch be used twice. */
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s.tmp", seq->path);
    f = fopen(tmp, "w");
    if (!f) {
        fprintf(stderr, "cannot write %s: %s\n", tmp, strerror(errno));
        return false;
    }
    fprintf(f, "%llu\n", (unsigned long long)seq->epoch);
    fflush(f);
    fsync(fileno(f));
    fclose(f);
    if (rename(tmp, seq->path) != 0) {
        fprintf(stderr, "cannot replace %s: %s\n", seq->path, strerror(errno));
        return false;
    }
    return true;
}

bool seq_init(struct seq_counter *seq, const char *path)
{
    seq->path = path;
    return seq_advance(seq);
}

uint64_t seq_next(struct seq_counter *seq)
{
    if (seq->count >= (1u << SEQ_BITS) && !seq_advance(seq))
        exit(1); /* better to stop than to send a seq twice */
    return seq->epoch << SEQ_BITS | seq->count++;
}

bool device_apply(struct device_state *state, const struct device_args *args,
                  bool has_interval, double interval, bool has_led, bool led)
{
    struct device_state before = *state;
    if (has_interval && interval >= MIN_INTERVAL)
        state->interval = interval;
    if (has_led) {
        state->led = led;
        if (args->led_path) {
            FILE *f = fopen(args->led_path, "w");
            if (f) {
                fputs(led ? "1\n" : "0\n", f);
                fclose(f);
            } else {
                fprintf(stderr, "LED: cannot write %s: %s\n", args->led_path, strerror(errno));
            }
        }
    }
    if (before.interval == state->interval && before.led == state->led)
        return false;
    printf("desired applied: interval %g led %s\n", state->interval, state->led ? "on" : "off");
    fflush(stdout);
    return true;
}

double read_temperature_c(void)
{
    /* A Linux board's SoC sensor if it has one; a plausible value if not. */
    FILE *f = fopen("/sys/class/thermal/thermal_zone0/temp", "r");
    long milli;
    if (f) {
        int ok = fscanf(f, "%ld", &milli) == 1;
        fclose(f);
        if (ok)
            return round(milli / 10.0) / 100.0;
    }
    return round((22.5 + 2.5 * sin((double)unix_s() / 60.0)) * 100.0) / 100.0;
}

double monotonic_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int64_t unix_s(void)
{
    return (int64_t)time(NULL);
}

double backoff_next_s(struct backoff *b)
{
    double delay = b->first_s * (double)(1u << (b->attempt < 16 ? b->attempt : 16));
    if (delay > b->cap_s)
        delay = b->cap_s;
    b->attempt++;
    /* Half fixed, half random: devices that lost the agent together (it
     * restarted) do not all come back in the same instant. */
    return delay / 2 + (delay / 2) * ((double)rand() / RAND_MAX);
}

void sleep_s(double seconds)
{
    struct timespec ts = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}
