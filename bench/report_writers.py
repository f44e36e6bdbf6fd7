#!/usr/bin/env python3
"""Writes the writer section of bench/results.md from bench/writers.sh's raw figures.

The section sits between the two marker comments below; the rest of results.md is kept (and
report.py keeps this section when it regenerates the rest)."""
import json
import statistics
import sys

BEGIN = "<!-- writers:begin (bench/writers.sh) -->"
END = "<!-- writers:end -->"


def fmt(x):
    return "{:,.0f}".format(x)


def main():
    (jsonl, stats_path, results, command, reps, secs, clients, elapsed, pgver,
     git) = sys.argv[1:11]
    wal_level = sys.argv[11] if len(sys.argv) > 11 else "replica"
    lag_path = sys.argv[12] if len(sys.argv) > 12 else ""
    runs = [json.loads(l) for l in open(jsonl) if l.strip()]
    sizes = sorted({r["rows"] for r in runs})
    tables = ["plain", "original", "ours"]
    wal = any(r["table"] == "wal" for r in runs)
    if wal:
        tables.append("wal")
    fig = {}
    for n in sizes:
        for t in tables:
            v = [r["tps"] * n for r in runs if r["rows"] == n and r["table"] == t]
            if v:
                fig[n, t] = (statistics.median(v), min(v), max(v))
    L = [BEGIN, "## Writers: what an event costs the database (issue 11)", ""]
    L.append("Command: `%s` (PostgreSQL %s, tree %s), %s repetitions of %s s per table and batch "
             "size, tables alternated (order reversed every other repetition); took %s s." %
             (command, pgver, git, reps, secs, elapsed))
    L.append("")
    L.append("One cluster, fsync on, synchronous_commit on, full_page_writes on, wal_level "
             + wal_level + " (every column); each table in its own database with 2 sessions LISTENing on "
             "`new_events` that read every notification as it comes; %s pgbench clients (`-j 2`), each transaction one INSERT of the "
             "original's statement with 1, 10 or 100 VALUES rows (100-byte JSON payload, 1,000 "
             "subscribers). *plain*: the original service's table without trigger; *original*: "
             "with its `AFTER INSERT ... FOR EACH ROW pg_notify('new_events', "
             "row_to_json(NEW)::text)` trigger; *ours*: `postgresql/schema.sql` (positions in "
             "the insert-only table `event_positions`, listed below `events`). Medians, "
             "min-max in brackets; the ratio is ours ÷ original of the medians." % clients)
    if wal:
        L.append("*wal*: the same schema switched to `event_piper_source wal` "
                 "(`postgresql/wal.sql`): the writers run no trigger of ours; nginx with the "
                 "module (2 workers, the positioner in one of them) reads the slot, positions "
                 "the rows and notifies; 18 SSE streams of 64 ids each read every event (checked "
                 "after each run: as many events received as written). Targets (issue 23): wal "
                 "≥ 2.5× original and ≥ 0.8× plain for single-row transactions, ≥ 0.8× plain "
                 "for 10-row transactions.")
    L.append("")
    if wal:
        L.append("| writers | plain | original trigger | ours | wal | ours ÷ original | target "
                 "| wal ÷ original | wal ÷ plain | wal targets |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
    else:
        L.append("| writers | plain | original trigger | ours | ours ÷ original | target |")
        L.append("|---|---|---|---|---|---|")
    wal_targets = {1: (2.5, 0.8), 10: (None, 0.8)}
    targets = {1: 0.9, 10: 0.8}
    for n in sizes:
        unit = "commits/s" if n == 1 else "rows/s"
        what = "single-row transactions" if n == 1 else "%d-row transactions" % n
        cells = []
        for t in tables:
            m = fig.get((n, t))
            cells.append("%s [%s–%s]" % (fmt(m[0]), fmt(m[1]), fmt(m[2])) if m else "–")
        ratio = ""
        verdict = "measured"
        if (n, "ours") in fig and (n, "original") in fig:
            r = fig[n, "ours"][0] / fig[n, "original"][0]
            ratio = "%.2f" % r
            if n in targets:
                verdict = "≥ %.1f: **%s**" % (targets[n], "met" if r >= targets[n] else "missed")
        row = "| %s, %s | %s | %s |" % (what, unit, " | ".join(cells), ratio + " | " + verdict)
        if wal:
            extra = ["", "", "measured"]
            if (n, "wal") in fig and (n, "original") in fig and (n, "plain") in fig:
                ro = fig[n, "wal"][0] / fig[n, "original"][0]
                rp = fig[n, "wal"][0] / fig[n, "plain"][0]
                extra[:2] = ["%.2f" % ro, "%.2f" % rp]
                if n in wal_targets:
                    to, tp = wal_targets[n]
                    parts = []
                    if to is not None:
                        parts.append("÷ original ≥ %.1f: **%s**" % (to, "met" if ro >= to else "missed"))
                    parts.append("÷ plain ≥ %.1f: **%s**" % (tp, "met" if rp >= tp else "missed"))
                    extra[2] = "; ".join(parts)
            row += " %s |" % " | ".join(extra)
        L.append(row)
    lag = [json.loads(l) for l in open(lag_path) if l.strip()] if lag_path else []
    if lag:
        L.append("")
        L.append("The positioner's lag while %s single-row writers insert at full rate on the wal "
                 "database for %d s (sampled each second): *slot lag* is the WAL between "
                 "`pg_current_wal_lsn()` and the slot's `confirmed_flush_lsn` (decoding and "
                 "positioning together); *lag ms* is the module's `positioner_lag_ms` (age of the "
                 "oldest decoded transaction not yet committed as positions); *behind* is the "
                 "last event id given minus the last position handed out (rows inserted, "
                 "committed or not, without a position yet)." % (clients, len(lag)))
        L.append("")
        L.append("| s | slot lag (bytes) | lag ms | behind (rows) | rows/s since last sample |")
        L.append("|---|---|---|---|---|")
        prev = None
        for x in lag:
            rate = ""
            if prev is not None and x.get("last_id") is not None and prev.get("last_id") is not None:
                rate = fmt(x["last_id"] - prev["last_id"])
            behind = ""
            if x.get("last_id") is not None:
                behind = fmt(x["last_id"] - x["last_position"])
            L.append("| %d | %s | %s | %s | %s |" % (
                x["t"], "–" if x["slot_lag_bytes"] is None else fmt(x["slot_lag_bytes"]),
                "–" if x["lag_ms"] is None else x["lag_ms"], behind, rate))
            prev = x
    L.append("")
    L.append("`pg_stat_user_tables` after all runs (autovacuum on, as in production; "
             "`n_dead_tup` is what vacuum has not yet removed):")
    L.append("")
    L.append("| table | n_tup_ins | n_tup_upd | n_tup_hot_upd | n_dead_tup | autovacuums "
             "| total size | heap size |")
    L.append("|---|---|---|---|---|---|---|---|")
    for line in open(stats_path):
        f = line.split()
        if len(f) != 8:
            continue
        name, ins, upd, hot, dead, av, total, heap = f
        L.append("| %s | %s | %s | %s | %s | %s | %.1f MB | %.1f MB |" % (
            name, fmt(int(ins)), fmt(int(upd)), fmt(int(hot)), fmt(int(dead)), av,
            int(total) / 1048576, int(heap) / 1048576))
    L.append("")
    L.append("Raw figures: `bench/results-writers.jsonl` (pgbench tps per run). Profiles and "
             "back-to-back experiments behind these figures (fixed cost per transaction, lock "
             "chain against one lock, positions in a side table): `bench/findings.md`.")
    L.append(END)
    section = "\n".join(L) + "\n"

    try:
        text = open(results).read()
    except FileNotFoundError:
        text = "# ngx_event_piper benchmark results\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(results, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
