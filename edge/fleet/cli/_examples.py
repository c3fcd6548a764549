"""The ``examples:`` block of each ``edge fleet`` verb's ``--help`` whose module does not write its own (``verb``).

Keyed by the verb's path under ``edge fleet``; ``edge.fleet.cli`` adds them once every verb is registered, to parsers
that have no epilog yet. Each line is a command an operator can run as written (after the fleet directory's setup).
"""

from __future__ import annotations

from typing import Final

__all__ = ["EXAMPLES"]

EXAMPLES: Final[dict[str, tuple[str, ...]]] = {
    "ca": (
        "edge fleet --dir /srv/fleet ca init",
        "edge fleet ca issue-server --host broker.lan --host 192.0.2.10",
        "edge fleet ca issue-client gateway",
        "edge fleet ca issue-client alice --operator",
    ),
    "ca init": ("edge fleet --dir /srv/fleet ca init", "edge fleet ca init --name acme-fleet-ca --days 3650"),
    "ca issue-server": (
        "edge fleet ca issue-server --host broker.lan",
        "edge fleet ca issue-server --host broker.lan --host 192.0.2.10 --broker-group mosquitto",
    ),
    "ca issue-client": (
        "edge fleet ca issue-client gateway            # the gateway's identity",
        "edge fleet ca issue-client operator --operator   # what `edge fleet command` connects as",
    ),
    "enroll": ("edge fleet enroll device.csr", "edge fleet --dir /srv/fleet enroll cam-a.csr --json"),
    "devices": (
        "edge fleet devices",
        "edge fleet devices --json | jq -r '.[] | select(.state == \"revoked\") | .device_id'",
    ),
    "revoke": ("edge fleet revoke cam-a", "edge fleet --dir /srv/fleet revoke cam-a && systemctl reload mosquitto"),
    "resume": ("edge fleet resume cam-a",),
    "broker-config": (
        "edge fleet broker-config",
        "edge fleet broker-config --port 8883 --bind 192.0.2.10",
        "edge fleet broker-config --persistence-location /var/lib/mosquitto-edge",
    ),
    "claims": (
        "edge fleet claims create --server fleet.example.net:8443",
        "edge fleet claims list",
        "edge fleet claims approve 3f2a9c01",
    ),
    "claims list": ("edge fleet claims list", "edge fleet claims list --json"),
    "claims revoke": ("edge fleet claims revoke 3f2a9c01",),
    "claims approve": ("edge fleet claims approve 3f2a9c01",),
    "serve": (
        "edge fleet serve --public-host fleet.example.net",
        "edge fleet serve --listen 192.0.2.10:8443 --broker broker.lan:8883",
    ),
    "models": (
        "edge fleet models init",
        "edge fleet models publish v2.onnx --name digits --version 2.0.0 --publisher acme --key acme.pem",
        "edge fleet models list --json",
        "edge fleet models serve --listen 127.0.0.1:8080",
    ),
    "models init": ("edge fleet --dir /srv/fleet models init", "edge fleet models init --expiry timestamp=1"),
    "models publish": (
        "edge fleet models publish v2.onnx --name digits --version 2.0.0 --publisher acme --key acme.pem \\",
        "    --golden golden.npz --latency-budget-ms 20 --requires onnxruntime=1.20",
        "edge fleet models publish broken.onnx --name digits --version 3.0.0 --publisher acme --key acme.pem --force",
    ),
    "models list": ("edge fleet models list", "edge fleet models list --name digits --json"),
    "models refresh": ("edge fleet models refresh   # a running gateway does this by itself",),
    "models keys rotate": ("edge fleet models keys rotate timestamp",),
    "models root": ("edge fleet models root --out root.json   # provision it on boxes as the trusted root",),
    "models serve": ("edge fleet models serve", "edge fleet models serve --listen 192.0.2.10:8080"),
    "publishers": (
        "edge fleet publishers keygen acme --out ./keys   # on the publisher's machine",
        "edge fleet publishers add acme keys/acme.pub --models digits,faces",
        "edge fleet publishers allow acme --models +plates,-faces",
    ),
    "publishers add": ("edge fleet publishers add acme acme.pub --models digits",),
    "publishers allow": (
        "edge fleet publishers allow acme --models +plates       # add a model",
        "edge fleet publishers allow acme --models=-faces        # take one away (= keeps the dash a value)",
        "edge fleet publishers allow acme --models digits,plates # replace the list",
    ),
    "publishers list": ("edge fleet publishers list", "edge fleet publishers list --json"),
    "publishers rotate": ("edge fleet publishers rotate acme acme-2027.pub",),
    "publishers remove": ("edge fleet publishers remove acme",),
    "publishers keygen": ("edge fleet publishers keygen acme --out ./keys",),
    "doctor": (
        "edge fleet doctor",
        "edge fleet doctor --broker-conf /etc/mosquitto/mosquitto.conf",
        "edge fleet doctor --connect --gateway gateway --json",
    ),
}
