"""A real RTSP server for the stream-source tests: GStreamer's gst-rtsp-server serving one H.264 file.

Two halves in one file:

- Run as a script by the system ``/usr/bin/python3`` (the Debian packages ``python3-gi`` and
  ``gir1.2-gst-rtsp-server-1.0``; the project's venv has no GObject bindings), it serves ``--file`` (Matroska with
  H.264) at ``rtsp://127.0.0.1:PORT/MOUNT`` over both RTP/UDP and RTP-over-RTSP (TCP), optionally behind Basic
  authentication, and prints ``ready`` once it listens. Every client gets its own pipeline from the start of the file,
  paced by the file's timestamps, like a camera; at the end of the file the server ends the stream (RTCP BYE).
- Imported by the tests (``RtspServer``), it starts, stops and kills that process; a restart keeps the port, so a
  client sees the camera go away and come back.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
MOUNT = "/digits"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def have_gst_rtsp_server() -> bool:
    """True where the system Python can load gst-rtsp-server (else the tests that need it are skipped)."""
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    return subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, check=False).returncode == 0


class RtspServer:
    """gst-rtsp-server in a subprocess, serving ``video`` on ``port`` (a free one by default).

    Args:
        video: a Matroska file with one H.264 stream.
        port: the TCP port to listen on.
        credentials: ``(user, password)`` to require Basic authentication, or None for an open server.
    """

    def __init__(self, video: Path, *, port: int | None = None, credentials: tuple[str, str] | None = None) -> None:
        self.video = video
        self.port = port or free_port()
        self.credentials = credentials
        self.proc: subprocess.Popen[str] | None = None

    def url(self, userinfo: str = "") -> str:
        """The stream's URL, with ``userinfo`` (``user:password``) when given."""
        at = f"{userinfo}@" if userinfo else ""
        return f"rtsp://{at}127.0.0.1:{self.port}{MOUNT}"

    def start(self, timeout: float = 15.0) -> None:
        """Start the server and wait until it listens."""
        args = [SYSTEM_PYTHON, __file__, "--port", str(self.port), "--file", str(self.video)]
        if self.credentials is not None:
            args += ["--user", self.credentials[0], "--password", self.credentials[1]]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready", or nothing when it died
        if line.strip() != "ready":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
            raise RuntimeError(f"rtsp server did not start: {line!r} {err}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"rtsp server not listening on {self.port}")

    def kill(self) -> None:
        """Kill the server at once (SIGKILL): connections drop as they would when a camera loses power."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None


def _serve(port: int, video: str, user: str | None, password: str | None) -> None:  # pragma: no cover (subprocess)
    import gi  # noqa: PLC0415 (the system Python's bindings, only in the server process)

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer  # noqa: PLC0415

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    # The file's own H.264, not re-encoded (the tests need the lossless pixels); SPS/PPS before every keyframe.
    location = video.replace("\\", "\\\\").replace('"', '\\"')
    factory.set_launch(
        f'( filesrc location="{location}" ! matroskademux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=-1 )'
    )
    factory.set_shared(False)  # each client from the start of the file
    if user is not None and password is not None:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", user)
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_permission_for_role(user, "media.factory.access", True)
        permissions.add_permission_for_role(user, "media.factory.construct", True)
        factory.set_permissions(permissions)
    server.get_mount_points().add_factory(MOUNT, factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    print("ready", flush=True)
    loop.run()


if __name__ == "__main__":  # pragma: no cover (subprocess)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--user")
    parser.add_argument("--password")
    a = parser.parse_args()
    _serve(a.port, a.file, a.user, a.password)
