"""`ecoserve admin …`: talk to the leading coordinator's admin service over NATS and print the answer.

`services/cli.py` wires it in with `configure(sub.add_parser("admin", ...))` and `set_defaults(func=run)`;
`python -m services.coordinator.admin_cli` runs it on its own.

    ecoserve admin [--nats-url URL] [--prefix P] [--timeout S] [--json] COMMAND
      status | instances | drain ID | resume ID | remove ID | config [KEY=VALUE ...]
      add-instance [ID] [--macro M] | remove-instance ID | scaling [KEY=VALUE ...]

Exit status 0 on success, 1 when the coordinator refuses the command or nobody answers, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError

from services.coordinator.admin_api import endpoint_subject
from shared.config import env_name
from shared.messages import AdminReply, AdminRequest, ErrorReply
from shared.subjects import DEFAULT_PREFIX, check_prefix
from shared.wire import WireError, decode, encode


class AdminCallError(Exception):
    """The command did not succeed; the message says why, for the operator."""


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the admin flags and subcommands to `parser` (so `ecoserve admin` can reuse them)."""
    parser.add_argument(
        "--nats-url",
        default=os.environ.get(env_name("nats_url"), "nats://127.0.0.1:4222"),
        help="NATS server URL (env ECOSERVE_NATS_URL)",
    )
    parser.add_argument(
        "--prefix",
        default=os.environ.get(env_name("prefix"), DEFAULT_PREFIX),
        help="subject prefix of the cluster (env ECOSERVE_PREFIX)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the coordinator")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    commands = parser.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    commands.add_parser("status", help="cluster summary: macro instances, members in order, queues, config")
    commands.add_parser("instances", help="every registered instance with its load")
    for name, text in (
        ("drain", "stop sending requests to an instance (it finishes what it holds)"),
        ("resume", "send requests to a drained instance again"),
        ("remove", "drain an instance, then shut it down (it deregisters when done)"),
    ):
        commands.add_parser(name, help=text).add_argument("instance_id")
    config = commands.add_parser("config", help="show the scheduling configuration, or set KEY=VALUE ...")
    config.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    add = commands.add_parser(
        "add-instance", help="take a spare instance (the first, or ID) into a macro instance (mitosis)"
    )
    add.add_argument("instance_id", nargs="?", help="the spare to add (default: the first spare)")
    add.add_argument(
        "--macro", dest="macro_instance_id", help="the macro instance (default: as expansion does)"
    )
    commands.add_parser(
        "remove-instance", help="take an instance out of its macro instance: it drains, then is a spare"
    ).add_argument("instance_id")
    scaling = commands.add_parser(
        "scaling", help="show mitosis scaling (settings, spares, signals), or set KEY=VALUE ... (enabled=on)"
    )
    scaling.add_argument("settings", nargs="*", metavar="KEY=VALUE")
    return parser


def _settings(values: list[str]) -> dict[str, Any]:
    updates: dict[str, Any] = {}
    for setting in values:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise AdminCallError(f"expected KEY=VALUE, got {setting!r}")
        updates[key] = value  # the coordinator parses and validates the text
    return updates


def request_for(args: argparse.Namespace) -> AdminRequest:
    command: str = args.admin_command
    if command in ("drain", "resume", "remove"):
        return AdminRequest(command=command, args={"instance_id": args.instance_id})
    if command in ("config", "scaling"):
        if not args.settings:
            return AdminRequest(command=f"{command}-get")
        return AdminRequest(command=f"{command}-set", args=_settings(args.settings))
    if command == "add-instance":
        chosen = {"instance_id": args.instance_id, "macro_instance_id": args.macro_instance_id}
        return AdminRequest(command=command, args={k: v for k, v in chosen.items() if v is not None})
    if command == "remove-instance":
        return AdminRequest(command=command, args={"instance_id": args.instance_id})
    return AdminRequest(command=command)


async def call(nats_url: str, prefix: str, request: AdminRequest, timeout: float) -> dict[str, Any]:
    """Send one admin request; its result, or AdminCallError."""

    async def quiet(_: Exception) -> None:
        return None

    subject = endpoint_subject(check_prefix(prefix), request.command)
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                nats_url,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.2,
                connect_timeout=timeout,
                error_cb=quiet,
            ),
            timeout,
        )
    except (OSError, NatsError, TimeoutError) as error:
        raise AdminCallError(
            f"cannot connect to NATS at {nats_url}: {error or type(error).__name__}"
        ) from None
    try:
        answer = await nc.request(subject, encode(request), timeout=timeout)
    except (NoRespondersError, TimeoutError):
        raise AdminCallError(
            f"no coordinator answered on {subject} within {timeout}s (is one running with prefix {prefix!r}?)"
        ) from None
    finally:
        await nc.close()
    try:
        reply = decode(answer.data, (AdminReply, ErrorReply))
    except WireError as error:
        raise AdminCallError(f"unreadable answer: {error}") from None
    if isinstance(reply, ErrorReply):
        raise AdminCallError(f"{reply.code}: {reply.message}")
    assert isinstance(reply, AdminReply)
    if not reply.ok:
        raise AdminCallError(reply.error or "the coordinator refused without saying why")
    return reply.result


# ---- rendering ----


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def render_instances(instances: list[dict[str, Any]]) -> list[str]:
    if not instances:
        return ["no instances registered"]
    rows = [["#", "INSTANCE", "MACRO", "STATE", "REPORTED", "RUN", "WAIT", "SENT", "KV FREE", "HEARTBEAT"]]
    for i in instances:
        free = "?" if i["kv_blocks_free"] is None else str(i["kv_blocks_free"])
        rows.append(
            [
                str(i["position"]),
                i["instance_id"],
                i["macro_instance_id"],
                i["state"],
                i["reported_state"] or "-",
                str(i["num_running"]),
                str(i["num_waiting"]),
                str(i["outstanding"]),
                f"{free}/{i['kv_blocks_total']}",
                f"{i['last_heartbeat_age']:.1f}s ago",
            ]
        )
    return _table(rows)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _ratio(value: float | str | None) -> str:
    if value is None:
        return "-"
    return "inf" if value == "inf" else f"{float(value):.2f}x"


def _macros(event: dict[str, Any]) -> str:
    # A split or a merge names its source first: source → the other.
    return " → ".join(event["macros"]) if event["action"] in ("split", "merge") else ",".join(event["macros"])


def render_events(events: list[dict[str, Any]]) -> list[str]:
    """Scaling events as a table, oldest first."""
    if not events:
        return ["no scaling events"]
    rows = [["TIME (UTC)", "ACTION", "CAUSE", "MACROS", "INSTANCES", "MEAN TTFT", "SLACK", "REASON"]]
    for event in events:
        rows.append(
            [
                datetime.fromtimestamp(event["time"], UTC).strftime("%Y-%m-%d %H:%M:%S"),
                event["action"],
                event["cause"],
                _macros(event) or "-",
                ",".join(event["instances"]) or "-",
                _seconds(event["mean_ttft"]),
                _ratio(event["slack_ratio"]),
                event["reason"],
            ]
        )
    return _table(rows)


def render_event(event: dict[str, Any]) -> str:
    """One event as a sentence (what an add-instance or remove-instance did)."""
    instances = ", ".join(event["instances"]) or "-"
    return f"{event['action']} {instances} ({_macros(event)}): {event['cause']}, {event['reason']}"


def render_scaling(view: dict[str, Any]) -> list[str]:
    """Mitosis scaling's state: settings, spares, draining instances, signals."""
    settings = view["settings"]
    lines = [
        f"scaling: {'on' if view['enabled'] else 'off'} (N_l={settings['n_lower']} N_u={settings['n_upper']} "
        f"TTFT SLO {settings['ttft_slo']}s; window {settings['window']}s, hold {settings['hold']}s, "
        f"cooldown {settings['cooldown']}s; macro choice {settings['macro_choice']})",
        "spares: "
        + (", ".join(view["spares"]) or "(none)")
        + (f"; draining: {', '.join(view['draining'])}" if view["draining"] else ""),
    ]
    signals = view["signals"]
    states = [
        name.replace("_", " ") for name in ("overloaded", "over_provisioned", "cooling_down") if signals[name]
    ]
    lines.append(
        f"signals: mean TTFT {_seconds(signals['mean_ttft'])}, saved TPOT {_ratio(signals['slack_ratio'])} "
        "its bound" + "".join(f"; {state}" for state in states)
    )
    return lines


def padg_summary(macro: dict[str, Any]) -> str:
    """The rolling activation of a PaDG macro instance, for its status line ("" under other policies)."""
    if macro.get("policy") != "padg":
        return ""
    active = macro.get("active") or "none"
    opened = macro.get("windows_opened") or {}
    windows = ", ".join(f"{i} {n}" for i, n in opened.items())
    epoch, pending = macro.get("window_epoch", 0), macro.get("pending", 0)
    text = f" — prefill window: {active} (epoch {epoch}), pending {pending}"
    return text + (f"; windows opened: {windows}" if windows else "")


def render(request: AdminRequest, result: dict[str, Any]) -> list[str]:
    command = request.command
    if command == "status":
        role = "leader" if result["leader"] else "standby"
        inflight = result["inflight_requests"]
        lines = [f"coordinator {result['coordinator_id']} ({role}), {inflight} requests in flight"]
        for macro in result["macro_instances"]:
            members = ", ".join(macro["members"]) or "(none)"
            lines.append(f"macro instance {macro['macro_instance_id']}: {members}{padg_summary(macro)}")
        if not result["macro_instances"]:
            lines.append("no macro instances")
        lines += ["", *render_instances(result["instances"]), ""]
        lines.append("config: " + " ".join(f"{k}={v}" for k, v in result["config"].items()))
        if "scaling" in result:
            lines += ["", *render_scaling(result["scaling"])]
        if "scaling_events" in result:
            lines += ["recent scaling events:", *render_events(result["scaling_events"])]
            if "scaling_events_error" in result:
                lines.append(f"(could not read the event log: {result['scaling_events_error']})")
        return lines
    if command == "instances":
        return render_instances(result["instances"])
    if command in ("drain", "resume", "remove"):
        heard = (
            "acknowledged"
            if result["instance_acknowledged"]
            else f"not acknowledged: {result['instance_error']}"
        )
        return [f"instance {result['instance_id']}: {result['state']} (instance {heard})"]
    if command in ("add-instance", "remove-instance"):
        return [render_event(event) for event in result["events"]] + render_scaling(result["scaling"])[1:2]
    if command in ("scaling-get", "scaling-set"):
        view = result["scaling"]
        lines = [f"set {', '.join(result['changed'])}"] if command == "scaling-set" else []
        lines += render_scaling(view)
        lines += [
            f"macro instance {macro['macro_instance_id']}: {', '.join(macro['members'])}"
            for macro in view["macro_instances"]
        ]
        settings = view["settings"]
        return lines + [""] + [f"{key} = {_setting(value)}" for key, value in settings.items()]
    lines = [f"set {', '.join(result['changed'])}"] if command == "config-set" else []
    return lines + [f"{key} = {value}" for key, value in result["config"].items()]


def _setting(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def run(args: argparse.Namespace) -> int:
    """Run the command parsed by a parser set up with `configure`."""
    try:
        request = request_for(args)
        result = asyncio.run(call(args.nats_url, args.prefix, request, args.timeout))
    except (AdminCallError, ValueError) as error:
        print(f"ecoserve admin: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print("\n".join(render(request, result)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = configure(argparse.ArgumentParser(prog="ecoserve admin", description="administer a cluster"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
