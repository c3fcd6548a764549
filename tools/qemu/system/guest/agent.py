"""The system image's test agent: runs the host's requests inside the guest and answers on virtio-serial.

It runs as root under systemd (``edge-system-agent.service``) in test images only, with the guest's own Python and
its standard library alone. The host side is ``tools/qemu/system/run.py``.

Protocol, one JSON object per line on the virtio-serial port named ``edge.agent``:

- the agent speaks first: ``{"hello": {"boot_id": ..., "uptime_s": ...}}``;
- the host sends ``{"id": N, "op": NAME, ...arguments}``; the agent answers ``{"id": N, "ok": true, "result": ...}``
  or ``{"id": N, "ok": false, "error": "..."}``, one request at a time, in order.

Operations, each with a ``timeout`` argument that bounds it, so the agent never blocks longer than the host allows:

- ``run``: ``argv``, ``timeout`` -> ``{"rc", "stdout", "stderr"}``;
- ``write_file``: ``path``, ``text`` -> null (parents created; for drop-ins under /run, the root being read-only);
- ``cursor``: -> the journal's current cursor (or null while it is empty);
- ``wait_journal``: ``matches`` (``FIELD=value`` strings, ANDed), optional ``contains`` (a substring of MESSAGE),
  ``after_cursor`` or ``from_boot`` (else: from now), ``timeout`` -> the first matching entry, as a dict of its
  fields. It follows the journal (``journalctl --follow``): an event, not a poll;
- ``kill``: ``pid``, ``signal`` -> null (kill(2): the image has no procps);
- ``poweroff``: asks systemd to power off and answers before it happens.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PORT_NAME = "edge.agent"
# Fields of a journal entry worth sending back; the rest is noise for the host.
ENTRY_FIELDS = (
    "MESSAGE",
    "MESSAGE_ID",
    "UNIT",
    "_SYSTEMD_UNIT",
    "_PID",
    "PRIORITY",
    "JOB_RESULT",
    "INVOCATION_ID",
    "_SYSTEMD_INVOCATION_ID",
    "__CURSOR",
    "__MONOTONIC_TIMESTAMP",
    "__REALTIME_TIMESTAMP",
)


class OpError(Exception):
    """A request the agent could not carry out; the message goes back to the host."""


def find_port() -> Path:
    """The device node of the virtio-serial port named ``PORT_NAME``."""
    for entry in sorted(Path("/sys/class/virtio-ports").glob("*")):
        name = entry / "name"
        if name.exists() and name.read_text().strip() == PORT_NAME:
            return Path("/dev") / entry.name
    raise SystemExit(f"agent: no virtio-serial port named {PORT_NAME}")


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def op_run(argv: list[str], timeout: float) -> dict[str, Any]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise OpError(f"{argv!r} did not finish within {timeout} s") from e
    except OSError as e:
        raise OpError(f"{argv!r}: {e}") from e
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def op_write_file(path: str, text: str, timeout: float) -> None:
    del timeout  # a write to /run does not block
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def op_cursor(timeout: float) -> str | None:
    out = op_run(["journalctl", "--lines=1", "--output=json", "--no-pager"], timeout)["stdout"].strip()
    return json.loads(out)["__CURSOR"] if out else None


def _message(entry: dict[str, Any]) -> str:
    message = entry.get("MESSAGE", "")
    if isinstance(message, list):  # journalctl sends non-UTF-8 messages as byte arrays
        return bytes(message).decode(errors="replace")
    return str(message or "")


def op_wait_journal(
    matches: list[str],
    timeout: float,
    contains: str | None = None,
    after_cursor: str | None = None,
    from_boot: bool = False,
) -> dict[str, Any]:
    argv = ["journalctl", "--follow", "--output=json", "--no-pager"]
    if after_cursor:
        argv.append(f"--after-cursor={after_cursor}")
    elif from_boot:
        argv += ["--boot", "--lines=all"]
    else:
        argv.append("--lines=0")
    # Matched here, not by journalctl: with matches, --after-cursor skips the first matching entry (it assumes the
    # entry it lands on is the cursor's own).
    wanted = dict(m.split("=", 1) for m in matches)
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    buffer = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OpError(f"no journal entry matching {matches} {contains!r} within {timeout} s")
            if not selector.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise OpError(f"journalctl ended (status {proc.wait()}) before an entry matched {matches}")
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                entry = json.loads(line)
                message = _message(entry)
                fields_match = all(str(entry.get(k)) == v for k, v in wanted.items())
                if fields_match and (contains is None or contains in message):
                    found = {k: entry[k] for k in ENTRY_FIELDS if k in entry}
                    found["MESSAGE"] = message
                    return found
    finally:
        proc.kill()
        proc.wait()
        selector.close()


def op_kill(pid: int, signal: int, timeout: float) -> None:
    del timeout  # kill(2) does not block
    os.kill(pid, signal)


def op_poweroff(timeout: float) -> None:
    subprocess.run(["systemctl", "poweroff", "--no-block"], check=True, timeout=timeout)


OPS = {
    "run": op_run,
    "write_file": op_write_file,
    "cursor": op_cursor,
    "wait_journal": op_wait_journal,
    "kill": op_kill,
    "poweroff": op_poweroff,
}


def serve(port: Path) -> None:
    fd = os.open(port, os.O_RDWR | os.O_NOCTTY)

    def send(message: dict[str, Any]) -> None:
        data = memoryview(json.dumps(message).encode() + b"\n")
        while data:
            data = data[os.write(fd, data) :]

    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    send({"hello": {"boot_id": boot_id, "uptime_s": uptime()}})
    buffer = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return  # the host went away (virtio-serial reports it as end of file): nothing left to answer
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            request = json.loads(line)
            rid = request.pop("id")
            op = OPS.get(request.pop("op"))
            try:
                if op is None:
                    raise OpError("unknown operation")
                send({"id": rid, "ok": True, "result": op(**request)})
            except (OpError, OSError, TypeError, ValueError, subprocess.SubprocessError) as e:
                send({"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    serve(find_port())
    sys.exit(0)
