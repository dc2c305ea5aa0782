"""Enrichment: ``plugins``, ``enrich``, ``cache``, ``keys``, ``watch`` and ``monitor``."""
from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Any, Optional

import click

from tq_mw_thehive import startup
from tq_mw_thehive.cli.common import (Options, age, common_options, config_of, fail, group_options, load,
                                      open_state, progress_logging, table)

_LEVELS = click.Choice(["WHITE", "CLEAR", "GREEN", "AMBER", "AMBER+STRICT", "RED"], case_sensitive=False)


@click.command("plugins")
@common_options("config")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def plugins_command(obj: Options, as_json: bool, **given: Any) -> None:
    """List every enrichment plugin: data types, flags, keys, state and the call limits in force."""
    from tq_mw_thehive.enrichment.keys import KeyStore
    from tq_mw_thehive.enrichment.registry import Registry, plugin_state

    cfg = load(obj.merged(**given), create_state=True)
    registry, keys = Registry.discover(cfg.enrichment.plugin_dirs), KeyStore(cfg.state_db)
    loaded = {id(p) for p in registry.loaded()}
    listing = [{"name": p.name, "state": plugin_state(p, cfg.enrichment, keys), "version": p.version,
                "data_types": list(p.data_types), "external": p.external, "active": p.active,
                "keys": {k: url for k, url in p.api_keys.items()}, "origin": p.origin,
                "description": p.description, "limits": _limits(p, cfg, id(p) in loaded)}
               for p in registry.plugins]
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    rows = [["PLUGIN", "STATE", "TYPES", "EXTERNAL", "ACTIVE", "KEYS (sign-up)", "LIMITS"]]
    for p in listing:
        rows.append([p["name"], p["state"], ",".join(p["data_types"]) or "-", "yes" if p["external"] else "no",
                     "yes" if p["active"] else "no",
                     ", ".join(f"{k} ({u})" for k, u in p["keys"].items()) or "-", _describe(p["limits"])])
    table(rows)


def _limits(plugin: Any, cfg: Any, loaded: bool) -> Optional[dict]:
    """The limits in force (the plugin's free tier, or ``enrichment.limits``), so an operator can check
    them against the key's plan; None for a plugin that did not load (its declarations are unknown)."""
    from tq_mw_thehive.enrichment.quota import limits_for

    if not loaded:
        return None
    limits = limits_for(plugin, cfg.enrichment.limits)
    return {"per_minute": limits.per_minute, "per_day": limits.per_day}


def _describe(limits: Optional[dict]) -> str:
    from tq_mw_thehive.enrichment.quota import Limits

    return "-" if limits is None else Limits(**limits).describe()


@click.group("cache")
@common_options("config")
@click.pass_context
def cache_group(ctx: click.Context, **given: Any) -> None:
    """The enrichment result cache."""
    group_options(ctx, given)


@cache_group.command("stats")
@common_options("config")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def cache_stats_command(obj: Options, as_json: bool, **given: Any) -> None:
    """Entries, hits, misses, errors and mean plugin time per plugin."""
    from tq_mw_thehive.enrichment.cache import ResultCache

    stats = ResultCache(load(obj.merged(**given)).state_db).stats()
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    rows = [["PLUGIN", "ENTRIES", "EXPIRED", "HITS", "MISSES", "ERRORS", "HIT RATE", "MEAN MS"]]
    for r in stats:
        rows.append([r["plugin"], r["entries"], r["expired"], r["hits"], r["misses"], r["errors"],
                     "-" if r["hit_rate"] is None else f"{r['hit_rate']:.0%}",
                     "-" if r["mean_lookup_ms"] is None else r["mean_lookup_ms"]])
    table(rows) if stats else click.echo("the cache is empty")


@cache_group.command("clear")
@common_options("config")
@click.option("--plugin", help="Only this plugin's entries.")
@click.pass_obj
def cache_clear_command(obj: Options, plugin: Optional[str], **given: Any) -> None:
    """Forget cached results (all, or one plugin's)."""
    from tq_mw_thehive.enrichment.cache import ResultCache

    removed = ResultCache(load(obj.merged(**given)).state_db).clear(plugin)
    click.echo(f"removed {removed} cached result(s)")


@cache_group.command("warm")
@common_options("config", "logging")
@click.option("--plugin", help="Only this plugin.")
@click.pass_obj
def cache_warm_command(obj: Options, plugin: Optional[str], **given: Any) -> None:
    """Look up every known indicator value whose cached result is missing or expired.

    Known values: the watch list and the observables already synced (as their latest event
    in the inbox carries them). The TLP/PAP gate and the plugin states apply as in the daemon.
    """
    from tq_mw_thehive import known_values
    from tq_mw_thehive.enrichment.warmup import Warmer
    from tq_mw_thehive.progress import Progress
    from tq_mw_thehive.services import Services

    opts = obj.merged(**given)
    tty = progress_logging(opts)
    cfg = config_of(opts)
    if not cfg.enrichment.enabled:
        fail("enrichment.enabled is false: nothing to warm", 2)
    services = Services(open_state(cfg))
    enricher = services.enricher()
    if plugin and plugin not in {p.name for p in enricher.registry.loaded()}:
        enricher.close()
        fail(f"no loaded plugin {plugin!r} (see `tq-mw-thehive plugins`)", 2)
    try:
        values = known_values.collect(services)
        with Progress("cache-warm", total=len(values), interactive=tty) as shown:
            counts = Warmer(enricher).run(values, only=plugin, progress=shown)
    finally:
        enricher.close()
    click.echo(f"cache warm: {len(values)} value(s); {counts['fetched']} fetched, {counts['not_found']} not found, "
               f"{counts['fresh']} already cached, {counts['skipped']} skipped, {counts['error']} error(s)")


@click.group("keys")
@common_options("config")
@click.pass_context
def keys_group(ctx: click.Context, **given: Any) -> None:
    """The team's API keys for the plugins (kept in the state database, mode 0600)."""
    group_options(ctx, given)


@keys_group.command("set")
@click.argument("name")
@common_options("config")
@click.pass_obj
def keys_set_command(obj: Options, name: str, **given: Any) -> None:
    """Store key NAME (one a loaded plugin uses): typed at a hidden prompt, or read from standard input."""
    from tq_mw_thehive.enrichment.keys import KeyStore, check_declared
    from tq_mw_thehive.enrichment.registry import Registry

    cfg = load(obj.merged(**given))
    try:
        name = check_declared(name, Registry.discover(cfg.enrichment.plugin_dirs).loaded())
    except ValueError as exc:
        fail(exc, 2)
    value = (click.prompt(f"{name}", hide_input=True) if sys.stdin.isatty()
             else sys.stdin.readline()).strip()
    try:
        KeyStore(cfg.state_db).set(name, value)
    except ValueError as exc:
        fail(exc, 2)
    click.echo(f"stored {name}")


@keys_group.command("list")
@common_options("config")
@click.pass_obj
def keys_list_command(obj: Options, **given: Any) -> None:
    """Key names, masked values, when set (an environment variable overrides a stored key)."""
    from tq_mw_thehive.enrichment.keys import KeyStore

    listing = KeyStore(load(obj.merged(**given)).state_db).listing()
    if not listing:
        click.echo("no keys")
        return
    table([["NAME", "VALUE", "SET", "FROM"]] +
          [[k["name"], k["value"], age(k["set_at"]), k["source"]] for k in listing])


@keys_group.command("delete")
@click.argument("name")
@common_options("config")
@click.pass_obj
def keys_delete_command(obj: Options, name: str, **given: Any) -> None:
    """Remove stored key NAME."""
    from tq_mw_thehive.enrichment.keys import KeyStore

    try:
        deleted = KeyStore(load(obj.merged(**given)).state_db).delete(name)
    except ValueError as exc:
        fail(exc, 2)
    if not deleted:
        fail(f"no stored key {name.strip().upper()}", 1)
    click.echo(f"deleted {name.strip().upper()}")


@click.command("enrich")
@click.argument("value")
@common_options("config")
@click.option("--type", "data_type", help="TheHive data type (default: guessed from the value).")
@click.option("--plugin", help="Only this plugin.")
@click.option("--tlp", type=_LEVELS, default="AMBER", show_default=True,
              help="TLP of the value: external plugins only see up to enrichment.max_tlp_external.")
@click.option("--pap", type=_LEVELS, default="AMBER", show_default=True, help="PAP of the value.")
@click.option("--refresh", is_flag=True,
              help="Ignore the cache and ask each plugin again (uses each online plugin's quota).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def enrich_command(obj: Options, value: str, data_type: Optional[str], plugin: Optional[str], tlp: str, pap: str,
                   refresh: bool, as_json: bool, **given: Any) -> None:
    """Look VALUE up through the plugins, with the same gate, cache and quotas as the daemon."""
    from tq_mw_thehive.enrichment.monitor import guess_type
    from tq_mw_thehive.enrichment.runner import Enricher

    opts = obj.merged(**given)
    try:
        startup.setup_logging(None, "1")  # warnings only, redacted, on stderr
    except startup.StartupError as exc:
        fail(exc, exc.exit_code)
    cfg = load(opts, create_state=True)
    data_type = data_type or guess_type(value)
    enricher = Enricher.from_config(cfg)
    if plugin and not enricher.plugins_for(data_type, plugin):
        fail(f"no loaded plugin {plugin!r} takes {data_type} values (see `tq-mw-thehive plugins`)", 2)
    if refresh:
        click.echo("--refresh: the cache is ignored; each online plugin's lookup uses its quota", err=True)
    # Over quota the row says so and when the next call is possible; nothing waits in the queue.
    runs = enricher.run(data_type, value, tlp.upper(), pap.upper(), only=plugin, bypass_cache=refresh, queue=False)
    enricher.close()
    if as_json:
        click.echo(json.dumps({"value": value, "type": data_type, "results": [
            {"plugin": r.plugin, "status": r.status, "verdict": r.verdict, "attributes": r.attributes,
             "data": r.data, "age_s": r.age_s, "reason": r.reason} for r in runs]}, indent=2, default=str))
        return
    click.echo(f"{value} ({data_type})")
    rows = [["PLUGIN", "VERDICT", "RESULT", "STATUS"]]
    for r in runs:
        shown = "; ".join(f"{k}: {v}" for k, v in r.attributes.items() if not k.endswith(" Verdict")) or "-"
        rows.append([r.plugin, r.verdict or "-", shown, r.describe()])
    table(rows) if runs else click.echo(f"no plugin takes {data_type} values")


@click.group("watch")
@common_options("config")
@click.pass_context
def watch_group(ctx: click.Context, **given: Any) -> None:
    """IOCs that `tq-mw-thehive monitor` re-checks on a schedule."""
    group_options(ctx, given)


@watch_group.command("add")
@click.argument("value")
@common_options("config")
@click.option("--type", "data_type", help="TheHive data type (default: guessed from the value).")
@click.option("--interval", help="Re-check interval (90m, 6h, 1d; default enrichment.monitor_interval).")
@click.option("--tlp", type=_LEVELS, help="TLP of the value (a new watch: AMBER).")
@click.option("--pap", type=_LEVELS, help="PAP of the value (a new watch: AMBER).")
@click.pass_obj
def watch_add_command(obj: Options, value: str, data_type: Optional[str], interval: Optional[str], tlp: str,
                      pap: str, **given: Any) -> None:
    """Watch VALUE (checked against its data type); the next `monitor` pass checks it."""
    from tq_mw_thehive.config import Duration
    from tq_mw_thehive.enrichment.monitor import WatchList, check_value, guess_type, watchable_types
    from tq_mw_thehive.enrichment.registry import Registry
    from tq_mw_thehive.type_mapping import TypeMapping

    cfg = load(obj.merged(**given))
    seconds = Duration.parse(interval) if interval else None
    if interval and not seconds:
        fail(f"--interval: not a duration: {interval!r} (e.g. 90m, 6h, 1d)", 2)
    if data_type:
        known = watchable_types(TypeMapping.from_config(cfg.sync),
                                Registry.discover(cfg.enrichment.plugin_dirs).loaded())
        if data_type not in known:
            fail(f"--type: unknown data type {data_type!r} (known: {', '.join(sorted(known))})", 2)
    guessed = data_type is None
    data_type = data_type or guess_type(value)
    try:
        check_value(data_type, value)
    except ValueError as exc:
        fail(f"{exc}" + (" (guessed from the value; give --type if it is another type)" if guessed else ""), 2)
    new = WatchList(cfg.state_db).add(value, data_type, interval_s=seconds, tlp=tlp.upper() if tlp else None,
                                      pap=pap.upper() if pap else None,
                                      default_interval_s=cfg.enrichment.monitor_interval)
    click.echo(f"{'watching' if new else 'updated watch of'} {value} ({data_type})")


@watch_group.command("list")
@common_options("config")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def watch_list_command(obj: Options, as_json: bool, **given: Any) -> None:
    """The watch list, next due first."""
    from tq_mw_thehive.enrichment.monitor import WatchList

    listing = WatchList(load(obj.merged(**given)).state_db).listing()
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    if not listing:
        click.echo("nothing watched")
        return
    table([["VALUE", "TYPE", "EVERY", "NEXT", "FROM", "TLP", "PAP"]] +
          [[w["value"], w["data_type"], f"{w['interval_s'] / 3600:g} h", age(w["next_due"]), w["origin"],
            w["tlp"] or "-", w["pap"] or "-"] for w in listing])


@watch_group.command("rm")
@click.argument("value")
@common_options("config")
@click.option("--type", "data_type", help="Only the watch of this data type.")
@click.pass_obj
def watch_rm_command(obj: Options, value: str, data_type: Optional[str], **given: Any) -> None:
    """Stop watching VALUE."""
    from tq_mw_thehive.enrichment.monitor import WatchList

    removed = WatchList(load(obj.merged(**given)).state_db).remove(value, data_type)
    if not removed:
        fail(f"{value} is not watched", 1)
    click.echo(f"no longer watching {value}")


@click.command("monitor")
@common_options("config", "logging")
@click.option("--once", is_flag=True, help="One pass over the due watches, then exit (for a systemd timer).")
@click.pass_obj
def monitor_command(obj: Options, once: bool, **given: Any) -> None:
    """Re-run the plugins for due watches; push changed results to ThreatQ."""
    from tq_mw_thehive.services import Services

    opts = obj.merged(**given)
    try:
        startup.setup_logging(opts.log_dir, opts.verbosity)
    except startup.StartupError as exc:
        fail(exc, exc.exit_code)
    cfg = config_of(opts)
    if not cfg.enrichment.enabled:
        fail("enrichment.enabled is false: nothing to monitor", 2)
    services = Services(open_state(cfg))
    monitor = services.monitor(services.enricher())
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    while True:
        counts = monitor.run_once()
        logging.getLogger("tq_mw_thehive.monitor").info(
            "monitor pass checked=%d changed=%d errors=%d", counts["checked"], counts["changed"], counts["errors"])
        if once or stopping.wait(60):
            break


COMMANDS = (plugins_command, enrich_command, cache_group, keys_group, watch_group, monitor_command)
