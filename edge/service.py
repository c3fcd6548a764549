"""``edge run``: the long-running service. Builds the pipeline from the configuration and runs it until the source
ends, ``--frames`` inferences are done, or SIGTERM/SIGINT asks for a clean shutdown.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edge import __version__
from edge.config import Config, resolve_device_id
from edge.errors import ConfigError, ModelError
from edge.inference.model import Model
from edge.inference.preprocess import backend
from edge.log import configure, event
from edge.ota.owner import hold_for_service
from edge.pipeline import Pipeline, PipelineStats
from edge.sensing.sources import open_source
from edge.sinks import JsonLinesSink, Sink
from edge.systemd import Notifier, WatchdogPolicy

if TYPE_CHECKING:
    from edge.enrollment.renewer import Renewer
    from edge.ota.agent import EventEmitter, OtaAgent
    from edge.ota.slots import ActiveModel
    from edge.ota.trial import TrialResult
    from edge.ota.updater import Updater
    from edge.telemetry.device import DeviceTelemetry

__all__ = ["FACTORY_MODEL", "run_service", "summary"]

log = logging.getLogger("edge.service")

FACTORY_MODEL = "digits-int8.onnx"


def factory_model_path() -> Path:
    """The model shipped with the package, used when the configuration names none."""
    return Path(str(resources.files("edge") / "models" / FACTORY_MODEL))


def summary(stats: PipelineStats, elapsed: float) -> dict[str, Any]:
    """The figures an operator wants after a run: counts, rates, latency percentiles, accuracy where labelled."""
    p50, p99 = stats.latency_percentiles(50, 99)
    out: dict[str, Any] = {
        "frames_in": stats.frames_in,
        "inferences": stats.inferences,
        "readings": stats.readings,
        "rejected": stats.rejected_total,
        "rejected_by_reason": dict(stats.rejected),
        "dropped": stats.dropped,
        "source_dropped": stats.source_dropped,
        "elapsed_s": round(elapsed, 3),
        "fps": round(stats.inferences / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_p50_us": round(p50),
        "latency_p99_us": round(p99),
    }
    if stats.labelled:
        out["accuracy"] = round(stats.correct / stats.labelled, 4)
    return out


def _supervise(pipeline: Pipeline, notifier: Notifier) -> None:
    """Wait for the pipeline while feeding systemd: watchdog pings only on progress, a status line every 5 s."""
    interval = notifier.watchdog_interval
    policy = WatchdogPolicy(interval, time.monotonic()) if interval else None
    # Short joins keep the main thread responsive to signals and the watchdog on time.
    step = min(0.5, interval / 2) if interval else 0.5
    next_status = time.monotonic() + 5.0
    while not pipeline.join(timeout=step):
        now = time.monotonic()
        # A source that is busy reconnecting (an unplugged camera, a broken stream) says so with alive_at: it is
        # not stuck, and restarting the service would not bring the camera back sooner.
        alive = max(pipeline.stats.last_progress, float(getattr(pipeline.source, "alive_at", 0.0)))
        if policy is not None and policy.due(now, alive):
            notifier.send(WATCHDOG=1)
        if now >= next_status:
            st = pipeline.stats
            notifier.send(
                STATUS=f"{st.inferences} inferences, {st.rejected_total} rejected, "
                f"{st.dropped + st.source_dropped} dropped"
            )
            next_status = now + 5.0


def run_service(cfg: Config, *, max_frames: int = 0) -> PipelineStats:
    """Run the pipeline the configuration describes; returns its statistics after a clean shutdown.

    Args:
        cfg: the validated configuration.
        max_frames: stop after this many inferences (0: run until the source ends or a signal arrives).
    """
    started = time.monotonic()
    configure(cfg.log.level, cfg.log.format)
    # First, before a model loads or the updater touches the slots: a box that does not know who it is (not enrolled,
    # or configured as another box than its certificate) refuses to start and says why.
    device_id = resolve_device_id(cfg)
    # Held until the process exits: `edge ota update/revert` refuse while it is (docs/ota.md, "A running service").
    owner = hold_for_service(cfg.device.data_dir, ota_on=bool(cfg.ota.repository))
    model_path = cfg.model.path or factory_model_path()
    ota: tuple[Updater, OtaAgent | None, EventEmitter] | None = None
    model: Model | None = None
    if cfg.ota.repository:
        ota = _start_updater(cfg, model_path)
    # The active slot, when valid, supersedes the configured model: it is the one the fleet committed. With updates
    # off (a blank repository) it still runs: blanking the URL stops updates, it does not undo the last one.
    active = ota[0].slots.active().path if ota is not None else _committed_model(cfg, model_path)
    if active != model_path:
        try:
            model = Model(active, threads=cfg.model.threads, spinning=cfg.model.spinning, warmup=cfg.model.warmup)
            model_path = active
        except ModelError as e:  # e.g. a runtime upgrade that no longer takes it: run the configured model
            event(log, logging.ERROR, "the active slot's model does not load", path=str(active), error=str(e))
    if model is None:
        model = Model(model_path, threads=cfg.model.threads, spinning=cfg.model.spinning, warmup=cfg.model.warmup)
    source = open_source(cfg.source, model_size=(model.input_spec.width, model.input_spec.height))
    telemetry: DeviceTelemetry | None = None
    sink: Sink
    if cfg.sink.kind == "telemetry":
        from edge.telemetry.device import DeviceTelemetry  # noqa: PLC0415 (paho, cryptography: only when used)

        telemetry = DeviceTelemetry(cfg, model_id=model.model_id, model_sha256=model.sha256, backend=backend())
        sink = telemetry.sink
    else:
        sink = JsonLinesSink(cfg.sink.path)
    overrides = {k: v for k, v in asdict(cfg.preprocess).items() if v is not None}
    pipeline = Pipeline(
        source,
        model,
        sink,
        top_k=cfg.model.top_k,
        queue_size=cfg.pipeline.queue_size,
        on_full=cfg.pipeline.on_full,
        max_frames=max_frames,
        preprocess=overrides,
    )
    event(
        log,
        logging.INFO,
        "service starting",
        version=__version__,
        device=device_id,
        model=model.model_id,
        model_sha256=model.sha256,
        model_path=str(model_path),
        input=f"{model.input_spec.dtype}{list(model.input_spec.shape)}",
        backend=pipeline.backend,
        source=cfg.source.kind,
        pixel_format=str(cfg.source.pixel_format),
        startup_ms=round((time.monotonic() - started) * 1000),
    )

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        event(log, logging.INFO, "shutdown requested", signal=signal.Signals(signum).name)
        pipeline.stop()

    if ota is not None:
        _wire_updater(cfg, ota, pipeline, telemetry)

    renewer: Renewer | None = None
    if telemetry is not None:
        from edge.enrollment.renewer import Renewer  # noqa: PLC0415

        renewer = Renewer(cfg)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    t0 = time.monotonic()
    closing: dict[str, Any] = {}
    notifier = Notifier()
    try:
        if telemetry is not None:
            telemetry.start()
        if renewer is not None:
            renewer.start()
        pipeline.start()
        if ota is not None and ota[1] is not None:
            ota[1].start()
        notifier.send(READY=1, STATUS=f"running {model.model_id} on {pipeline.backend}")
        _supervise(pipeline, notifier)
    finally:
        notifier.send(STOPPING=1, STATUS="stopping")
        notifier.close()
        if ota is not None and ota[1] is not None:
            ota[1].stop()
        if renewer is not None:
            renewer.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if owner is not None:
            owner.release()
        if telemetry is not None:
            closing = telemetry.close()
        else:
            sink.close()
    event(log, logging.INFO, "service stopped", **summary(pipeline.stats, time.monotonic() - t0), **closing)
    return pipeline.stats


def _committed_model(cfg: Config, factory: Path) -> Path:
    """The committed slot's model (or ``factory``) when updates are off: read only, nothing is created."""
    if not (cfg.device.data_dir / "models").is_dir():
        return factory
    from edge.ota.slots import Slots  # noqa: PLC0415

    active = Slots(cfg.device.data_dir / "models", factory).active()
    if active.manifest is not None:
        event(log, logging.INFO, "updates off ([ota] repository blank): running the committed model",
              model=active.manifest.model_id, slot=active.slot)  # fmt: skip
    return active.path


def _start_updater(cfg: Config, factory: Path) -> tuple[Updater, OtaAgent | None, EventEmitter]:
    """Build the updater and finish an update a crash interrupted, before the model to run is chosen.

    Without a readable trusted root the service still runs the committed slot's model, but takes no updates (the
    agent is None, update commands are refused as unavailable): telemetry matters more than updates.
    """
    from edge.ota.agent import EventEmitter, OtaAgent, open_updater  # noqa: PLC0415 (tuf: only when updates are on)
    from edge.ota.errors import OtaError  # noqa: PLC0415
    from edge.wire.errors import ManifestError  # noqa: PLC0415

    emitter = EventEmitter()
    try:
        updater, floor = open_updater(cfg, factory, emit=emitter)
    except ConfigError as e:
        event(log, logging.ERROR, "over-the-air updates disabled", error=str(e))
        updater, _ = open_updater(cfg, factory, emit=emitter, repo_url="")
        return updater, None, emitter
    try:
        updater.recover()
    # The service runs whatever is valid; the agent's first check tries again.
    except (OtaError, ManifestError, OSError) as e:
        event(log, logging.WARNING, "OTA recovery at start failed", error=str(e))
    agent = OtaAgent(updater, check_interval_s=cfg.ota.check_interval_s, time_floor=floor)
    return updater, agent, emitter


def _wire_updater(
    cfg: Config,
    ota: tuple[Updater, OtaAgent | None, EventEmitter],
    pipeline: Pipeline,
    telemetry: DeviceTelemetry | None,
) -> None:
    """Connect the updater to the running service: commits swap the pipeline's model, commands reach the agent."""
    updater, agent, emitter = ota

    def now_running(model: Model) -> None:
        pipeline.swap_model(model)
        if telemetry is not None:
            telemetry.set_model(model.model_id, model.sha256)

    def on_commit(result: TrialResult, _active: ActiveModel) -> None:
        now_running(result.model)

    def on_revert(active: ActiveModel) -> None:
        now_running(Model(active.path, threads=cfg.model.threads, spinning=cfg.model.spinning, warmup=cfg.model.warmup))

    updater.on_commit = on_commit
    updater.on_revert = on_revert
    if telemetry is not None:
        emitter.attach(telemetry.sink)
    if telemetry is not None and agent is not None:
        telemetry.enable_ota(
            request_update=agent.request_update,
            request_rollback=agent.request_rollback,
            on_verified=lambda cmd: agent.prove_time(cmd.issued_at),
            # The command floor follows the OTA floor's lower bound, time/reset lowers both, the status shows both.
            time_floor=agent.time_floor,
        )
