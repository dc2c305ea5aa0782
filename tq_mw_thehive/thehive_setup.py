"""``tq-mw-thehive thehive-setup``: make TheHive call this daemon.

TheHive 4 takes the endpoint from its application.conf (printed here, filled in) and the
organisation's notification through ``PUT /api/config/organisation/notification`` (reference
``thehive-webhooks.md`` §1), which this command sends after showing it and asking. That PUT
replaces the organisation's whole notification list, so the current list is read first and our
entry is added to it. TheHive 5 has no such API: the endpoint and notification are made in its
UI, and this command prints the exact values to enter. The texts come from ``configure``, which
prints the same instructions after a configuration run.
"""
from __future__ import annotations

import json
from typing import Any, List, Optional, Tuple

import click

from tq_mw_thehive import configure
from tq_mw_thehive.configure import ADMIN_KEY_VARIABLE, ENDPOINT_NAME, NOTIFICATION_PATH, SECRET_MASK
from tq_mw_thehive.thehive.api import TheHiveClient, TheHiveError, TheHiveNotFound, TheHiveUnavailable

NOTIFICATION = NOTIFICATION_PATH.rsplit("/", 1)[1]  # the organisation configuration item's name
CACHE_NOTE = "TheHive applies notification changes within 5 minutes (it caches them)."


class SetupError(Exception):
    """The registration cannot go on; the message says why (exit code 1)."""


def is_ours(entry: Any) -> bool:
    """Whether a notification entry already sends every event to our endpoint."""
    if not isinstance(entry, dict):
        return False
    notifier, trigger = entry.get("notifier"), entry.get("trigger")
    return (isinstance(notifier, dict) and notifier.get("name") == "webhook"
            and notifier.get("endpoint") == ENDPOINT_NAME
            and isinstance(trigger, dict) and trigger.get("name") == "AnyEvent")


def read_notifications(client: TheHiveClient) -> Tuple[Optional[List[Any]], Optional[str]]:
    """(the organisation's notification list, None) or (None, why it cannot be read).

    A refused key or an outage raises ``SetupError``: the PUT would fail the same way.
    """
    try:
        item = client.organisation_config(NOTIFICATION)
    except TheHiveUnavailable as exc:
        raise SetupError(str(exc)) from None
    except TheHiveNotFound:
        return None, "TheHive does not serve GET " + NOTIFICATION_PATH
    except TheHiveError as exc:
        return None, str(exc)
    value = item.get("value") if isinstance(item, dict) else None
    if isinstance(value, list):
        return value, None
    return None, "TheHive answered GET " + NOTIFICATION_PATH + " in an unexpected shape"


def planned_value(current: Optional[List[Any]]) -> Optional[List[Any]]:
    """What to PUT: the current list plus our entry; None when it is already there."""
    if current is None:
        return [configure.notification_entry()]
    if any(is_ours(entry) for entry in current):
        return None
    return list(current) + [configure.notification_entry()]


def preview(client: TheHiveClient, value: List[Any]) -> str:
    """The request as it will be sent, the API key masked."""
    lines = [f"PUT {client.url}{NOTIFICATION_PATH}", f"Authorization: Bearer {SECRET_MASK}"]
    if client.organisation:
        lines.append(f"X-Organisation: {client.organisation}")
    lines += ["Content-Type: application/json", "", json.dumps({"value": value}, indent=2)]
    return "\n".join(lines)


def register(client: TheHiveClient, yes: bool, confirm=click.confirm, echo=click.echo) -> bool:
    """Show, ask, PUT and read back the notification; True when TheHive has it (or already had it)."""
    current, unreadable = read_notifications(client)
    value = planned_value(current)
    if value is None:
        echo(f"The organisation already sends every event (AnyEvent) to endpoint {ENDPOINT_NAME}: nothing to send.")
        return True
    echo("This request enables the notification (AnyEvent -> webhook endpoint "
         f"{ENDPOINT_NAME}) for the organisation of the API key:\n")
    echo(preview(client, value))
    echo("")
    if unreadable:
        echo(f"Warning: the current notification list could not be read ({unreadable}). This PUT "
             "replaces the organisation's whole list: if it has other notifications, add them to the "
             "body and send it yourself (the curl command of `tq-mw-thehive configure`).")
    elif current:
        echo(f"It keeps the organisation's {len(current)} other notification(s).")
    if not yes and not confirm("Send it?", default=False):
        echo("Nothing was sent.")
        return False
    try:
        client.set_organisation_config(NOTIFICATION, value)
    except TheHiveError as exc:
        raise SetupError(f"{exc} (an org admin's API key, permission manageConfig, is needed: "
                         f"--api-key or {ADMIN_KEY_VARIABLE})") from None
    echo(f"Sent: TheHive accepted PUT {NOTIFICATION_PATH}.")
    after, unreadable = read_notifications(client)
    if after is None:
        echo(f"It cannot be read back ({unreadable}): check Organisation > Notifications in TheHive.")
    elif not any(is_ours(entry) for entry in after):
        raise SetupError("TheHive accepted the PUT but does not list the notification when read back")
    else:
        echo("Verified: TheHive lists the notification. " + CACHE_NOTE)
    return True
