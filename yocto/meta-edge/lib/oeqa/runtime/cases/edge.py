#
# SPDX-License-Identifier: Apache-2.0
#
"""Runtime tests of the edge service on a booted image (``bitbake -c testimage edge-image``, TEST_SUITES "edge").

What a box must show: the service is active (systemd received READY=1) and has not restarted; its watchdog is set
and fed; it runs as the unprivileged ``edge`` user with ``dialout`` and no capabilities; the C extension imports and
is the preprocessing backend; /data is a writable mount while the root is read-only; and a telemetry run seals
signed, chained envelopes. ``test_edge_ptest`` runs the package's ptest when the image carries ``edge-ptest``.
"""

import json
import os
import time

from oeqa.core.decorator.depends import OETestDepends
from oeqa.runtime.case import OERuntimeTestCase
from oeqa.runtime.decorator.package import OEHasPackage

UNIT = "edge.service"
# Emulated boards import numpy and onnxruntime slowly: generous, but finite.
START_TIMEOUT_S = 300
# A command as the service's user, through systemd (no su needed; the user has no login shell): output on stdout, the
# command's exit status as ours.
AS_EDGE = "systemd-run --quiet --wait --pipe --uid=edge --gid=edge --"
TELEMETRY_CHECK = os.path.join(os.path.dirname(__file__), "..", "files", "edge", "telemetry_check.py")


class EdgeServiceTest(OERuntimeTestCase):
    def run_ok(self, cmd, timeout=120):
        status, output = self.target.run(cmd, timeout=timeout)
        self.assertEqual(status, 0, msg=f"{cmd} failed ({status}):\n{output}")
        return output.strip()

    def unit_properties(self, *names):
        output = self.run_ok(f"systemctl show {UNIT} " + " ".join(f"-p {n}" for n in names))
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)

    def journal(self):
        _, output = self.target.run(f"journalctl -u {UNIT} --no-pager -n 60")
        return output

    def main_pid(self):
        pid = self.unit_properties("MainPID")["MainPID"]
        self.assertNotEqual(pid, "0", msg="edge has no main process:\n" + self.journal())
        return pid

    @OETestDepends(["ssh.SSHTest.test_ssh"])
    @OEHasPackage(["edge"])
    def test_edge_service_active(self):
        # Type=notify: "active" means edge loaded its model and said READY=1, not merely that it was started.
        deadline = time.monotonic() + START_TIMEOUT_S
        props = self.unit_properties("ActiveState")
        while props["ActiveState"] in ("inactive", "activating") and time.monotonic() < deadline:
            time.sleep(2)
            props = self.unit_properties("ActiveState")
        props = self.unit_properties("ActiveState", "SubState", "Type", "NRestarts", "Result")
        self.assertEqual(props["ActiveState"], "active", msg=f"{props}\n{self.journal()}")
        self.assertEqual(props["SubState"], "running", msg=str(props))
        self.assertEqual(props["Type"], "notify", msg=str(props))
        self.assertEqual(props["NRestarts"], "0", msg="edge restarted:\n" + self.journal())

    @OETestDepends(["edge.EdgeServiceTest.test_edge_service_active"])
    def test_edge_watchdog_is_set_and_fed(self):
        props = self.unit_properties("WatchdogUSec", "WatchdogTimestampMonotonic", "MainPID")
        self.assertEqual(props["WatchdogUSec"], "30s", msg=str(props))
        # edge pings at half the period, and only while records come out (two frames a second here): within 20 s
        # systemd must have seen a ping, and the process must be the same one (a missed watchdog restarts it).
        time.sleep(20)
        later = self.unit_properties("WatchdogTimestampMonotonic", "MainPID", "NRestarts")
        self.assertGreater(
            int(later["WatchdogTimestampMonotonic"]),
            int(props["WatchdogTimestampMonotonic"]),
            msg="no watchdog ping in 20 s:\n" + self.journal(),
        )
        self.assertEqual(later["MainPID"], props["MainPID"])
        self.assertEqual(later["NRestarts"], "0")

    @OETestDepends(["edge.EdgeServiceTest.test_edge_service_active"])
    def test_edge_runs_as_its_user(self):
        status = self.run_ok(f"cat /proc/{self.main_pid()}/status")
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = self.run_ok("id -u edge")
        gid = self.run_ok("id -g edge")
        dialout = self.run_ok("grep '^dialout:' /etc/group | cut -d: -f3")
        video = self.run_ok("grep '^video:' /etc/group | cut -d: -f3")
        self.assertNotEqual(uid, "0")
        self.assertEqual(fields["Uid"].split(), [uid] * 4, msg=fields["Uid"])
        self.assertEqual(fields["Gid"].split(), [gid] * 4, msg=fields["Gid"])
        self.assertIn(dialout, fields["Groups"].split(), msg=fields["Groups"])
        self.assertIn(video, fields["Groups"].split(), msg=fields["Groups"])
        # CapabilityBoundingSet= is empty and NoNewPrivileges=yes: the process holds no capability at all.
        self.assertEqual(int(fields["CapEff"], 16), 0, msg=fields["CapEff"])
        self.assertEqual(int(fields["CapBnd"], 16), 0, msg=fields["CapBnd"])

    @OETestDepends(["ssh.SSHTest.test_ssh"])
    @OEHasPackage(["edge"])
    def test_edge_extension_imports(self):
        # EDGE_REQUIRE_NATIVE: a missing or broken extension is an ImportError here, never a quiet numpy fallback.
        backend = self.run_ok(
            "EDGE_REQUIRE_NATIVE=1 python3 -c "
            "'import edge._native; from edge.inference import preprocess; print(preprocess.backend())'"
        )
        self.assertTrue(backend.startswith("native-"), msg=backend)
        if self.run_ok("uname -m") == "aarch64":
            self.assertEqual(backend, "native-neon")

    @OETestDepends(["ssh.SSHTest.test_ssh"])
    @OEHasPackage(["edge"])
    def test_edge_root_is_read_only(self):
        mounts = [line.split() for line in self.run_ok("cat /proc/mounts").splitlines()]
        root = [m for m in mounts if m[1] == "/"][-1]
        self.assertIn("ro", root[3].split(","), msg=" ".join(root))

    @OETestDepends(["edge.EdgeServiceTest.test_edge_service_active"])
    def test_edge_data_is_writable(self):
        mounts = [line.split() for line in self.run_ok("cat /proc/mounts").splitlines()]
        data = [m for m in mounts if m[1] == "/data"]
        self.assertTrue(data, msg="/data is not a mount point")
        self.assertIn("rw", data[-1][3].split(","), msg=" ".join(data[-1]))
        # tmpfiles.d made the state directory, for the service's user only.
        self.assertEqual(self.run_ok("stat -c '%U %G %a' /data/edge"), "edge edge 700")
        probe = "/data/edge/.oeqa-write-probe"
        out = self.run_ok(f"{AS_EDGE} /bin/sh -c 'echo written > {probe} && sync && cat {probe} && rm {probe}'")
        self.assertEqual(out, "written")

    @OETestDepends(["edge.EdgeServiceTest.test_edge_service_active"])
    def test_edge_telemetry_envelope_produced(self):
        # A second edge process (the telemetry sink, a fresh identity, its own directory) beside the running service:
        # the envelopes it seals while no broker answers must be signed, chained and carry every record.
        tmp = self.run_ok("mktemp -d")
        script = f"{tmp}/telemetry_check.py"
        self.target.copyTo(TELEMETRY_CHECK, script)
        self.run_ok(f"chmod 0755 {tmp} && install -d -o edge -g edge -m 0700 {tmp}/work")
        out = self.run_ok(f"{AS_EDGE} python3 {script} {tmp}/work", timeout=900)
        self.target.run(f"rm -rf {tmp}")
        result = json.loads(out.splitlines()[-1])
        self.assertGreaterEqual(result["envelopes"], 1, msg=out)
        self.assertEqual(result["inference_records"], 20, msg=out)

    @OETestDepends(["ssh.SSHTest.test_ssh"])
    @OEHasPackage(["edge-ptest"])
    def test_edge_ptest(self):
        status, output = self.target.run("ptest-runner edge", timeout=3600)
        self.assertEqual(status, 0, msg=output)
        self.assertIn("PASS:", output)
        self.assertNotIn("FAIL:", output, msg=output)
