"""The ``tq-mw-thehive`` command.

With no subcommand it behaves as the vendor guide's tool: configure if
``config.yaml`` is missing, then serve. The guide's flat flags (-c -ll -v -p -li
-ep -ds) are accepted before the subcommand and, for subcommands, after it too
(``common_options``).

One module per concern: ``daemon`` (the root command and ``worker``), ``setup``
(configure, check, thehive-setup, demo), ``inbox`` (status, replay, purge, backfill),
``enrichment`` (plugins, enrich, cache, keys, watch, monitor); ``common`` holds what
they share.
"""
from __future__ import annotations

# How many dead letters `replay` puts back per transaction (short write locks, visible progress),
# and how often `replay --wait` looks at the inbox. cli/inbox.py reads them here when it runs.
REPLAY_BATCH = 500
REPLAY_WAIT_POLL_S = 1.0

from tq_mw_thehive.cli import daemon, enrichment, inbox, setup  # noqa: E402
from tq_mw_thehive.cli.common import DEFAULT_LISTENER, DEFAULT_PORT, Options, common_options  # noqa: E402
from tq_mw_thehive.cli.daemon import cli  # noqa: E402

for _module in (daemon, setup, inbox, enrichment):
    for _command in _module.COMMANDS:
        cli.add_command(_command)
del _module, _command

__all__ = ["cli", "main", "Options", "common_options", "DEFAULT_LISTENER", "DEFAULT_PORT",
           "REPLAY_BATCH", "REPLAY_WAIT_POLL_S"]


def main() -> None:
    cli(prog_name="tq-mw-thehive")
