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
    runs = [json.loads(l) for l in open(jsonl) if l.strip()]
    sizes = sorted({r["rows"] for r in runs})
    tables = ["plain", "original", "ours"]
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
             "replica; each table in its own database with 2 sessions LISTENing on "
             "`new_events` that read every notification as it comes; %s pgbench clients (`-j 2`), each transaction one INSERT of the "
             "original's statement with 1, 10 or 100 VALUES rows (100-byte JSON payload, 1,000 "
             "subscribers). *plain*: the original service's table without trigger; *original*: "
             "with its `AFTER INSERT ... FOR EACH ROW pg_notify('new_events', "
             "row_to_json(NEW)::text)` trigger; *ours*: `postgresql/schema.sql` (positions in "
             "the insert-only table `event_positions`, listed below `events`). Medians, "
             "min-max in brackets; the ratio is ours ÷ original of the medians." % clients)
    L.append("")
    L.append("| writers | plain | original trigger | ours | ours ÷ original | target |")
    L.append("|---|---|---|---|---|---|")
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
        L.append("| %s, %s | %s | %s |" % (what, unit, " | ".join(cells), ratio + " | " + verdict))
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
