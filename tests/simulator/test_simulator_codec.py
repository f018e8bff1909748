"""The simulator speaks MQTT through the agent's one codec, and imports nothing else of the agent."""

from __future__ import annotations

import subprocess
import sys


def test_the_simulator_pulls_in_the_codec_but_not_the_agent():
    code = (
        "import sys, konsul.simulator.mqtt_device\n"
        "agent = [m for m in sys.modules if m.startswith(('konsul.protocols', 'konsul.sync', 'konsul.edge', 'konsul.hub'))"
        " and not m.startswith('konsul.protocols.mqtt.codec') and m not in ('konsul.protocols', 'konsul.protocols.mqtt')]\n"
        "assert not agent, agent\n"
        "assert 'konsul.protocols.mqtt.codec' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
