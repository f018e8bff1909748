# Settings of this device. Copy to the board next to main.py and edit.

# Wi-Fi; leave WIFI_SSID empty if the board's network is set up elsewhere.
WIFI_SSID = "my-network"
WIFI_PASSWORD = "my-password"

# The Konsul Edge agent and its MQTT port (konsul edge --mqtt-addr).
AGENT_HOST = "192.168.1.10"
AGENT_PORT = 1883

# This device's id, and the token the agent issued for it once, at creation:
#   konsul devices create <id>      or
#   curl -X PUT http://EDGE:8500/v1/devices/<id>
# An empty TOKEN connects anonymously (agent started with --allow-anonymous).
DEVICE_ID = "pico-1"
TOKEN = ""

# Seconds between telemetry samples until the desired state says otherwise.
INTERVAL = 10

# The LED that desired "led" switches: "LED" on a Pico W, 2 on most ESP32 boards.
LED_PIN = "LED"

# The temperature sensor: "rp2040" reads the Pico's internal sensor (ADC 4);
# "tmp36" reads a TMP36 on SENSOR_PIN (on an ESP32, e.g. 34).
SENSOR = "rp2040"
SENSOR_ADC = 4
SENSOR_PIN = None

# The file that keeps the boot counter behind "seq" (see main.py). Keep it.
STATE_FILE = "konsul_seq"

# Set the clock over NTP at start, so samples carry "ts".
NTP = True

KEEPALIVE = 60  # seconds
RECONNECT_MIN = 1  # seconds, first reconnect delay, doubled up to RECONNECT_MAX
RECONNECT_MAX = 60
