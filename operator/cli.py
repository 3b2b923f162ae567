"""``kubetune operator``: run the operator (the CLI wires ``add_arguments`` and ``run``).

``kopf run -m kubetune.operator.handlers -A`` works too; this entry point adds the settings
from the environment, structured logs, the liveness endpoint and the metrics endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys

import kopf

from kubetune.operator.settings import Settings, SettingsError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        metavar="NAMESPACE",
        help="watch this namespace (repeatable; default: KUBETUNE_NAMESPACES, else all namespaces)",
    )
    parser.add_argument("--log-format", choices=["json", "text"], help="default: KUBETUNE_LOG_FORMAT or json")
    parser.add_argument("--health-port", type=int, help="liveness endpoint port, 0 disables (default 8080)")
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus /metrics port, 0 disables (default 9090)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log kopf's handling of every object")
    parser.add_argument("--debug", action="store_true", help="log every API request kopf makes")


def settings_from(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    overrides = {
        "namespaces": tuple(args.namespaces) if args.namespaces else None,
        "log_format": args.log_format,
        "health_port": args.health_port,
        "metrics_port": args.metrics_port,
    }
    update = {key: value for key, value in overrides.items() if value is not None}
    return Settings.model_validate(settings.model_dump() | update) if update else settings


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except (SettingsError, ValueError) as exc:
        print(f"kubetune operator: {exc}", file=sys.stderr)
        return 2
    log_format = kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL
    # kopf logs every handler run at INFO; keep its noise for --verbose and our transitions always.
    kopf.configure(
        verbose=args.verbose, debug=args.debug, quiet=not (args.verbose or args.debug), log_format=log_format
    )
    logging.getLogger("kubetune").setLevel(logging.DEBUG if args.debug else logging.INFO)
    import kubetune.operator.handlers  # noqa: F401  (registers the handlers)

    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    tune_gc()
    try:
        asyncio.run(
            kopf.operator(
                clusterwide=not settings.namespaces,
                namespaces=list(settings.namespaces),
                # One replica (the Deployment uses the Recreate strategy): no peering objects.
                standalone=True,
                liveness_endpoint=liveness,
                memo=kopf.Memo(config=settings),
            )
        )
    except KeyboardInterrupt:
        return 130
    return 0


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a process that allocates a lot of short-lived dicts.

    Every watch event and API answer is parsed into fresh dicts; with CPython's default gen-0
    threshold (700) a burst of 1000 new jobs triggered ~1200 collections costing ~18 % of the
    operator's CPU (bench/bench_operator.py). Freezing what the imports created keeps collections
    from rescanning modules and classes, and a larger gen-0 threshold lets short-lived objects die
    by reference counting first; memory stays bounded (cycles are still collected).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune operator", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
