"""The admin contract shared by the coordinator's admin service and `ecoserve admin`: the nats.micro
service name and the commands, each on its own subject `{prefix}.admin.<command>`.

Every endpoint takes an AdminRequest whose `command` is the endpoint's and answers an AdminReply (or an
ErrorReply: bad_message for undecodable input, internal for a coordinator bug). Arguments:
  status, instances, config-get: none
  drain, resume, remove: {"instance_id": str}
  config-set: {key: value, ...} (values typed or as text; see scheduling_config.py for the keys)
  add-instance: {"instance_id"?: str, "macro_instance_id"?: str} (a spare, the first when not named, into
    the macro instance named, or where an expansion would put it)
  remove-instance: {"instance_id": str} (out of its macro instance: it drains, then is a spare)
  scaling-get: none
  scaling-set: {key: value, ...} (scaling_settings.py's keys and n_lower, n_upper, ttft_slo)
"""

from __future__ import annotations

from shared import subjects

SERVICE_NAME = "ecoserve-admin"
SERVICE_VERSION = "0.1.0"
COMMANDS = (
    "status",
    "instances",
    "drain",
    "resume",
    "remove",
    "config-get",
    "config-set",
    "add-instance",
    "remove-instance",
    "scaling-get",
    "scaling-set",
)


def endpoint_subject(prefix: str, command: str) -> str:
    return f"{subjects.admin(prefix)}.{command}"
