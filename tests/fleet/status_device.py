"""A device's status session in a child process: a retained birth on connect and a Last Will, then it waits to be
killed (no DISCONNECT, so the broker publishes the will). Args: host port ca cert key device_id."""

from __future__ import annotations

import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


def main() -> None:
    host, port, ca, cert, key, device_id = sys.argv[1:7]
    topic = f"devices/{device_id}/status"
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
    c.will_set(topic, json.dumps({"state": "offline", "reason": "lost", "device": device_id}), qos=1, retain=True)
    ready = threading.Event()
    c.on_connect = lambda *_a: ready.set()
    c.connect(host, int(port), keepalive=5)
    c.loop_start()
    if not ready.wait(10):
        sys.exit("could not connect")
    birth = {"state": "online", "device": device_id, "model": "digits@1.0.0", "outbox_backlog": 7, "ts": time.time()}
    c.publish(topic, json.dumps(birth), qos=1, retain=True).wait_for_publish(10)
    print("online", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
