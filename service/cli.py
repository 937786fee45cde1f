"""The ``sensorwatch`` console command: the library's commands plus the ones that need the network
(``serve``). The library's own CLI (:mod:`sensorwatch.cli`) never opens a socket."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from sensorwatch import cli as lib_cli


def _serve(args: argparse.Namespace) -> int:
    from service import http_server
    from service.app import create_app
    from service.engine import RecoveryError, check_state
    from service.runtime import exit_process
    from service.settings import SettingsError, load_settings

    try:
        settings = load_settings(args.config)
        if settings.nats_url:  # cluster mode: a worker of the group (service/cluster)
            return _serve_cluster(settings, args)
        # The watchdog exits the process (status 70) once a thread the service needs died, for its
        # supervisor to restart it (service/runtime.py, Service._watch).
        app = create_app(settings, insecure_no_auth=args.insecure_no_auth, on_fatal=exit_process)
        check_state(settings)
    except (SettingsError, RecoveryError) as exc:
        print(f"sensorwatch: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn turns SIGTERM/SIGINT into a lifespan shutdown: Service.stop drains and snapshots. Once
    # shut down, uvicorn re-raises the signal under the handlers that were there before it started; with
    # Python's defaults that kills the process (status -15/143, or a KeyboardInterrupt traceback) after
    # a clean drain. These no-op handlers only take effect then: a graceful stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    # uvicorn with header and body timeouts and a connection cap (service/http_server.py).
    return http_server.serve(app, settings, args.host, args.port)


def _serve_cluster(settings: Any, args: argparse.Namespace) -> int:
    from service import http_server
    from service.cluster.app import create_cluster_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_cluster_app(settings, http_url=f"http://{args.host}:{args.port}")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    return http_server.serve(app, settings, args.host, args.port)


def _cluster_config(args: argparse.Namespace) -> int:
    from service.cluster.topology import Topology

    topology = Topology(args.topic, "sensorwatch", args.partitions, "sensorwatch")
    print(topology.server_config(args.mqtt_listen))
    return 0


def _stopped(signum: int, frame: FrameType | None) -> None:
    """The signal uvicorn re-raises after its graceful shutdown: already handled."""


def _simulate(args: argparse.Namespace) -> int:
    from sensorwatch.training.cli import simulate_files
    from service import simulator

    if not args.mqtt_url:
        return simulate_files(args)
    # SIGTERM (docker stop, a supervisor) stops it as cleanly as Ctrl-C: flush, disconnect, exit 0.
    with simulator.stop_on_signals() as stop:
        return simulator.run(
            args.mqtt_url,
            devices=args.devices,
            rate=args.rate,
            channels=args.channels,
            duration_s=args.duration,
            seed=args.seed,
            anomaly_rate=args.anomaly_rate,
            labels_out=sys.stdout if args.labels else None,
            stop=stop,
            time_lapse=args.time_lapse,
            inject_after=args.inject_after,
        )


def _bench_e2e(args: argparse.Namespace) -> int:
    from service import bench_e2e

    return bench_e2e.main(args)


def _add_drain_workloads(p: argparse.ArgumentParser) -> None:
    """The workloads of the benches that drain queued messages (``bench e2e``, ``bench cluster``)."""
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--messages", type=int, help="one-reading messages per run (default 30000)")
    p.add_argument("--gateway-messages", type=int, help="50-reading gateway messages per run (default 10000)")
    p.add_argument("--devices", type=int, help="devices of the one-reading workload (default 1000)")
    p.add_argument("--gateway-devices", type=int, help="devices of the gateway workload (default 200)")
    p.add_argument("--runs", type=int, default=3, help="runs per workload (medians are reported)")


def _add_bench_e2e(sub: argparse._SubParsersAction) -> None:
    bsub = next(a for a in sub.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    e = bsub.add_parser(
        "e2e", help="readings/s broker → outcome: the service vs a bare MQTT consumer, and live latency"
    )
    _add_drain_workloads(e)
    e.add_argument("--protocol", choices=("5", "3.1.1"), help="MQTT version (default: the service's)")
    e.add_argument("--model", help="SENSORWATCH_MODEL of the service (default: its default)")
    e.add_argument(
        "--env",
        action="append",
        metavar="KEY=VALUE",
        help="extra SENSORWATCH_* setting of the service (repeatable)",
    )
    e.add_argument("--latency-seconds", type=float, help="live latency run length (default 5)")
    e.add_argument(
        "--latency-fraction",
        type=float,
        default=0.5,
        help="live latency rate as a fraction of the service's one-reading rate",
    )
    e.add_argument("--quick", action="store_true", help="small default counts (a smoke run)")
    e.set_defaults(func=_bench_e2e)
    c = bsub.add_parser(
        "cluster", help="readings/s of one cluster-mode worker vs the single-node service, same run"
    )
    _add_drain_workloads(c)
    c.add_argument("--nodes", type=int, default=1, choices=(1, 3), help="NATS servers (3: a cluster, R3)")
    c.add_argument("--model", help="SENSORWATCH_MODEL of both (default: the default)")
    c.add_argument("--env", action="append", metavar="KEY=VALUE", help="extra SENSORWATCH_* setting of both")
    c.add_argument("--quick", action="store_true", help="small default counts (a smoke run)")
    c.set_defaults(func=_bench_cluster, protocol=None, latency_seconds=None, latency_fraction=0.5)
    w = bsub.add_parser("wal", help="the service's scoring path with WAL_SYNC off / none / fsync, same run")
    w.add_argument("--json", help="write the results as JSON here")
    w.add_argument("--devices", type=int, default=1000, help="devices of the one-reading workload")
    w.add_argument("--messages", type=int, default=50_000, help="one-reading messages per pass")
    w.add_argument("--trials", type=int, default=3)
    w.add_argument("--model", help="model reference or 'builtin' (default: the default model)")
    w.set_defaults(func=_bench_wal)


def _bench_cluster(args: argparse.Namespace) -> int:
    from service import bench_cluster

    return bench_cluster.main(args)


def _bench_wal(args: argparse.Namespace) -> int:
    from service import bench_pipeline

    return bench_pipeline.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = lib_cli.build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    s = sub.add_parser("serve", help="run the service (MQTT ingestion, REST, metrics)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--config", help="TOML file with settings (environment variables win)")
    s.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow starting without SENSORWATCH_ADMIN_TOKEN (admin endpoints open!)",
    )
    s.set_defaults(func=_serve)

    c = sub.add_parser(
        "cluster-config",
        help="print the mappings and MQTT block every NATS server of a cluster-mode deployment needs",
    )
    c.add_argument("--partitions", type=int, default=12, help="SENSORWATCH_PARTITIONS of the workers")
    c.add_argument("--topic", default="sensors/+/readings", help="SENSORWATCH_TOPIC_READINGS")
    c.add_argument("--mqtt-listen", default="0.0.0.0:1883", help="the server's MQTT listener")
    c.set_defaults(func=_cluster_config)

    # The library's `simulate` writes files; with --mqtt-url it needs the network, so it is served here.
    sub.choices["simulate"].set_defaults(func=_simulate)
    _add_bench_e2e(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded in model cards
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
