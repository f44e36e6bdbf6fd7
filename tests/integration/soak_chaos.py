"""The soak: `make soak` (not part of `make test`: pytest collects only test_*.py files, and this
one is named on the command line).

The chaos test's mix (test_chaos.py: its writers, clients, disruptions and checks), for
SOAK_MINUTES (default 20) instead of 44 seconds: C++ writers insert, roll back and ride out
restarts; 72 EventSource-like clients (60 with one id, 12 with several) drop their connections at
random and resume with Last-Event-ID; nginx is reloaded and the worker holding the LISTEN
connection is killed with -9 during the warm-up; PostgreSQL is restarted every
SOAK_PG_RESTART_EVERY seconds for the whole run.

Every SOAK_SAMPLE_S seconds (default 10) it samples the nginx workers' RSS and open fds (sums over
the current workers), the module's PostgreSQL connections (pg_stat_activity), and the clients'
counts: expected (the committed events of each client's ids, summed over the
clients), delivered, lost (a committed position below the newest one a client got that it never
got: streams deliver in position order, so it can no longer come), duplicated, out of order.

It fails on any loss or duplication (during the run, and at the end byte for byte against the
table, as the chaos test does) and on growth: the samples after the warm-up are cut in thirds,
and the median of the last third may not exceed the median of the first by more than
  worker RSS  3 % + 1 MiB (a leak of 100 bytes per client connection fails a 20-minute run),
  worker fds  5 % + 2,
  PostgreSQL connections  + 1 (and never more than a listener plus the replay connections of
              every worker).
Worker restarts (reload, kill -9) happen only in the warm-up, so that the measured thirds watch
the same worker processes: a reload or a respawn starts fresh workers and would hide a leak.

Writes to SOAK_OUT (default bench/): soak.csv (the samples), soak.png (gnuplot) and the "Soak"
section of results.md (between its soak markers; the rest of the file is kept).
"""

import csv
import datetime
import os
import statistics
import subprocess
import threading
import time
import zlib
from bisect import bisect_left, bisect_right

import pytest

import harness
from harness import T, fd_count, rss_kb
# test_chaos first: it puts tests/chaos on the path.
from test_chaos import (CONSUMERS, NGINX_CONF, ChaosClient, ClientPool,  # noqa: F401
                        Writers, check_clients, committed_frames, db, disrupt, expected_for,
                        make_clients, table_checks, writer_accounts)
from piper_chaos import module_backends, status, wait_all_listening  # noqa: E402

MINUTES = float(os.environ.get("SOAK_MINUTES", "20"))
SAMPLE_S = float(os.environ.get("SOAK_SAMPLE_S", "10"))
WRITERS = int(os.environ.get("SOAK_WRITERS", "4"))
WRITER_PAUSE_MS = int(os.environ.get("SOAK_WRITER_PAUSE_MS", "150"))
PG_RESTART_EVERY = float(os.environ.get("SOAK_PG_RESTART_EVERY", "300"))
RSS_TOLERANCE, RSS_SLACK_KB = 0.03, 1024
FD_TOLERANCE, FD_SLACK = 0.05, 2
PG_SLACK = 1
REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.environ.get("SOAK_OUT") or os.path.join(REPO, "bench")
SEED = int(os.environ.get("EVENT_PIPER_CHAOS_SEED", "0")) or int(time.time())
WORKERS = 2
REPLAY_CONNECTIONS = 2  # event_piper_replay_connections in test_chaos.NGINX_CONF

COLUMNS = ["t_s", "workers", "worker_rss_kb", "worker_fds", "pg_connections", "clients_connected",
           "expected", "delivered", "lost", "duplicated", "out_of_order", "connections",
           "holder_pid"]


def say(msg):
    harness.say("    [soak] %s" % msg)


class SoakClient(ChaosClient):
    # A checksum of each frame instead of its bytes: minutes of events for 72 clients.
    keep = staticmethod(zlib.crc32)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.n_checked = 0       # entries of self.got already counted
        self.seen_ids = set()
        self.max_id = 0
        self.checked_to = 0      # positions up to here were looked for
        self.lost = []
        self.dup = 0
        self.disorder = 0

    def account(self, truth, known_to):
        """Counts what arrived since the last call; positions up to min(newest id got,
        known_to) that the client's ids have in `truth` and it never got are lost."""
        got = self.got
        while self.n_checked < len(got):
            i = got[self.n_checked][0]
            self.n_checked += 1
            if i in self.seen_ids:
                self.dup += 1
            self.seen_ids.add(i)
            if i < self.max_id:
                self.disorder += 1
            self.max_id = max(self.max_id, i)
        upto = min(self.max_id, known_to)
        if upto > self.checked_to:
            for k in self.ids:
                ps = truth[k]
                for p in ps[bisect_right(ps, self.checked_to):bisect_right(ps, upto)]:
                    if p not in self.seen_ids:
                        self.lost.append(p)
            self.checked_to = upto


class Truth:
    """The committed positions of each consumer, read a little at a time during the run."""

    def __init__(self, db):
        self.db = db
        self.positions = {k: [] for k in CONSUMERS}
        self.known = set()
        self.known_to = 0        # the newest position read so far
        self.low = [0, 0]        # read from the newest position of two reads ago (overlap)

    def refresh(self):
        try:
            rows = self.db.sql("select subscriber, position from event_log "
                               "where position > %s order by position", (self.low[0],))
        except Exception as e:  # PostgreSQL restarting: next time
            return repr(e)
        for sub, pos in rows:
            pos = int(pos)
            if pos in self.known:
                continue
            self.known.add(pos)
            ps = self.positions.get(sub)
            if ps is not None:
                if ps and pos < ps[-1]:
                    ps.insert(bisect_left(ps, pos), pos)
                else:
                    ps.append(pos)
        newest = max(self.known_to, int(rows[-1][1]) if rows else 0)
        self.low = [self.low[1], newest]
        self.known_to = newest
        return None

    def count_for(self, clients):
        return sum(len(self.positions[k]) for cl in clients for k in cl.ids)


def sample(t, ngx, db, clients, truth):
    pids = ngx.worker_pids()
    rss = [rss_kb(p) for p in pids]
    fds = [fd_count(p) for p in pids]
    try:
        pg_conns = len(module_backends(db))
    except Exception:
        pg_conns = None
    try:
        holder = int(status(ngx).get("listener_holder_pid", 0))
    except Exception:
        holder = None
    truth.refresh()
    for cl in clients:
        cl.account(truth.positions, truth.known_to)
    return {"t_s": round(t, 1), "workers": len(pids),
            "worker_rss_kb": sum(r for r in rss if r is not None),
            "worker_fds": sum(f for f in fds if f is not None),
            "pg_connections": pg_conns,
            "clients_connected": sum(cl.conn is not None for cl in clients),
            "expected": truth.count_for(clients),
            "delivered": sum(len(cl.got) for cl in clients),
            "lost": sum(len(cl.lost) for cl in clients),
            "duplicated": sum(cl.dup for cl in clients),
            "out_of_order": sum(cl.disorder for cl in clients),
            "connections": sum(cl.connects for cl in clients),
            "holder_pid": holder}


def thirds(samples, key, warmup_s):
    """(median of the first third, median of the last third) of the samples after the warm-up
    (None where a sample has no value), or None if there are too few."""
    vals = [s[key] for s in samples if s["t_s"] >= warmup_s and s[key] is not None]
    if len(vals) < 6:
        return None
    n = len(vals) // 3
    return statistics.median(vals[:n]), statistics.median(vals[-n:])


def growth_verdicts(samples, warmup_s):
    """[(what, first, last, allowed last, ok)]."""
    out = []
    for key, rel, slack in (("worker_rss_kb", RSS_TOLERANCE, RSS_SLACK_KB),
                            ("worker_fds", FD_TOLERANCE, FD_SLACK),
                            ("pg_connections", 0.0, PG_SLACK)):
        m = thirds(samples, key, warmup_s)
        if m is None:
            out.append((key, None, None, None, False))
            continue
        first, last = m
        allowed = first * (1 + rel) + slack
        out.append((key, first, last, allowed, last <= allowed))
    return out


def plot(csv_path, png_path, warmup_s):
    script = """
set terminal pngcairo size 1200,800 font ",10"
set output '%(png)s'
set datafile separator ','
set key top left
set xlabel 'minutes'
set grid
set multiplot layout 2,2 title 'make soak: %(title)s'
set arrow from %(w)f, graph 0 to %(w)f, graph 1 nohead dashtype 2 lc 'gray'
set title 'nginx workers RSS (sum, MiB)'
plot '%(csv)s' using ($1/60):($3/1024) with lines lw 2 title 'RSS'
set title 'nginx workers open fds (sum) and clients connected'
plot '%(csv)s' using ($1/60):4 with lines lw 2 title 'fds', \\
     '' using ($1/60):6 with lines title 'clients connected'
set title 'module PostgreSQL connections'
set yrange [0:*]
plot '%(csv)s' using ($1/60):5 with steps lw 2 title 'connections'
set title 'deliveries (cumulative; right axis: lost + duplicated + out of order)'
set yrange [0:*]
set y2range [0:*]
set y2tics
plot '%(csv)s' using ($1/60):8 with lines lw 2 title 'delivered', \\
     '' using ($1/60):($9+$10+$11) axes x1y2 with lines lw 2 title 'lost + dup + disorder'
unset multiplot
""" % {"png": png_path, "csv": csv_path, "w": warmup_s / 60.0,
       "title": "%.0f min, sample every %.0f s; dashed: end of warm-up" % (MINUTES, SAMPLE_S)}
    r = subprocess.run(["gnuplot"], input=script, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    if r.returncode != 0:
        return "gnuplot failed: %s" % r.stdout.strip()
    return None


def write_section(path, text):
    begin, end = "<!-- soak:begin (make soak) -->", "<!-- soak:end -->"
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    block = begin + "\n" + text.rstrip("\n") + "\n" + end
    if begin in old and end in old:
        new = old.split(begin, 1)[0] + block + old.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(new)


def git_tree():
    r = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return r.stdout.strip() or "?"


def test_soak(db, nginx, request):
    duration = MINUTES * 60
    warmup = min(max(60.0, 0.15 * duration), duration / 2)
    say("%.1f minutes, warm-up %.0f s, a sample every %.0f s, %d writers (pause up to %d ms), "
        "seed %d" % (MINUTES, warmup, SAMPLE_S, WRITERS, WRITER_PAUSE_MS, SEED))
    os.makedirs(OUT, exist_ok=True)
    ngx = nginx.start(db, workers=WORKERS, wait_listening=False)
    wait_all_listening(ngx)
    clients = make_clients(ngx.port, SEED, SoakClient)
    request.addfinalizer(lambda: [c.close(0) for c in clients])
    writers = Writers(db, nginx.tmp, count=WRITERS, seed=SEED, max_pause_ms=WRITER_PAUSE_MS)
    request.addfinalizer(writers.kill)

    # Worker restarts in the warm-up only (see the module's docstring); PostgreSQL restarts
    # throughout.
    schedule = [(0.3 * warmup, "reload"), (0.6 * warmup, "kill")]
    t = 0.45 * warmup
    while t < duration - 30:
        schedule.append((t, ("pg", 2.0)))
        t += PG_RESTART_EVERY
    schedule.sort(key=lambda e: e[0])
    log, problems = [], []
    t_start = time.monotonic()
    stop = threading.Event()

    def disruptions():
        try:
            for when, what in schedule:
                if stop.wait(max(0.0, t_start + when - time.monotonic())):
                    return
                log.append(disrupt(what, ngx, db, t_start))
                say(log[-1])
        except Exception as e:  # reported by the main thread
            problems.append(repr(e))

    writers.start()
    disruptor = threading.Thread(target=disruptions, daemon=True)
    disruptor.start()
    pool = ClientPool(clients, t_start)
    truth = Truth(db)
    samples = []
    csv_path = os.path.join(OUT, "soak.csv")
    with open(csv_path, "w", newline="") as f:
        out = csv.DictWriter(f, COLUMNS)
        out.writeheader()
        next_sample = t_start + SAMPLE_S
        while True:
            pool.pump(min(next_sample, t_start + duration))
            now = time.monotonic()
            if now >= t_start + duration:
                break
            s = sample(now - t_start, ngx, db, clients, truth)
            samples.append(s)
            out.writerow(s)
            f.flush()
            if len(samples) % 6 == 0:
                say("%5.0f s: RSS %d kB, fds %d, pg %s, delivered %d, lost %d, duplicated %d"
                    % (s["t_s"], s["worker_rss_kb"], s["worker_fds"], s["pg_connections"],
                       s["delivered"], s["lost"], s["duplicated"]))
            next_sample += SAMPLE_S
        stop.set()
        disruptor.join(T(60))

        writer_outputs = writers.stop()
        rows, final = committed_frames(db)
        targets = {cl.idx: (expected_for(cl, final)[-1][0] if expected_for(cl, final) else 0)
                   for cl in clients}
        pool.calm()
        drain_s = pool.drain(targets, T(60))
        pool.close()
        # Once the clients are closed: counts after the drain (not a point of the plot).
        last = sample(time.monotonic() - t_start, ngx, db, clients, truth)
        samples.append(last)
    elapsed = time.monotonic() - t_start

    committed, rolled, aborted, unknown, errors = writer_accounts(writer_outputs)
    in_table, unpositioned, out_of_id_order, big = table_checks(db)
    totals, bad_clients, shutdown_503 = check_clients(clients, final)
    growth = growth_verdicts(samples[:-1], warmup)
    max_pg = max((s["pg_connections"] or 0) for s in samples if s["t_s"] >= warmup)
    pg_bound = 1 + WORKERS * REPLAY_CONNECTIONS
    png_path = os.path.join(OUT, "soak.png")
    plot_error = plot(csv_path, png_path, warmup)

    # Report, in the log and in results.md.
    start = samples[0]
    first = next((s for s in samples if s["t_s"] >= warmup), samples[0])
    end = samples[-2] if len(samples) > 1 else samples[-1]
    failures = []
    if totals["lost"] or totals["duplicated"] or totals["out_of_order"] or totals["unexpected"] \
            or totals["wrong_bytes"] or bad_clients:
        failures.append("deliveries: %d of %d clients did not get exactly their events"
                        % (len(bad_clients), len(clients)))
    if end["lost"] or end["duplicated"]:
        failures.append("lost or duplicated during the run")
    for key, a, b, allowed, ok in growth:
        if not ok:
            failures.append("growth of %s: first third %s, last third %s (allowed %s)"
                            % (key, a, b, allowed))
    if max_pg > pg_bound:
        failures.append("%d module PostgreSQL connections after the warm-up (bound %d)"
                        % (max_pg, pg_bound))
    if errors:
        failures.append("writer errors: %s" % errors[:3])
    if problems:
        failures.append("disruptions: %s" % problems)
    if unpositioned:
        failures.append("%d committed rows without a position" % unpositioned)
    if in_table != committed:
        failures.append("the table and the writers disagree on what was committed")
    if rolled & set(in_table) or aborted & set(in_table):
        failures.append("rolled back or aborted transactions are in the table")
    verdict = "passed" if not failures else "FAILED: " + "; ".join(failures)

    def g(key):
        r = next(x for x in growth if x[0] == key)
        if r[1] is None:
            return "too few samples"
        return "%s → %s (allowed ≤ %s): %s" % (
            "%.0f" % r[1], "%.0f" % r[2], "%.0f" % r[3], "ok" if r[4] else "**grew**")

    n_events = sum(len(v) for v in final.values())
    lines = [
        "## Soak (issue 19)", "",
        "Command: `make soak SOAK_MINUTES=%g` (tests/integration/soak_chaos.py), on %s, tree %s, "
        "seed %d; ran %.1f min (warm-up %.0f s), a sample every %.0f s; the machine was shared "
        "with other work (the soak asserts loss, duplication and growth, not speed). **%s**"
        % (MINUTES, datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
           git_tree(), SEED, elapsed / 60, warmup, SAMPLE_S, verdict), "",
        "The chaos test's mix for the whole run: %d C++ writers (transactions of 1–4 rows, 12 %% "
        "rolled back, 6 %% of payloads over 8000 bytes), %d clients (%d with several ids) that "
        "drop their connection at random and resume with Last-Event-ID, some reading slowly; "
        "nginx reloaded and the listener's holder killed with -9 in the warm-up, PostgreSQL "
        "restarted every %.0f s (pg_ctl stop -m fast, 2 s, pg_ctl start). Disruptions:" %
        (WRITERS, len(clients), sum(len(c.ids) > 1 for c in clients), PG_RESTART_EVERY), ""]
    lines += ["- %s" % line for line in log]
    lines += ["",
              "| | |", "|---|---|",
              "| events committed (for the clients' ids) | %d (%d rows in the table) |"
              % (n_events, len(rows)),
              "| transactions committed / rolled back / cut by a restart | %d / %d / %d |"
              % (len(committed), len(rolled), len(aborted)),
              "| client connections | %d (%d '503 shutting down' answers during the reload) |"
              % (sum(c.connects for c in clients), shutdown_503),
              "| deliveries expected / delivered | %d / %d |"
              % (totals["expected"], totals["delivered"]),
              "| lost / duplicated / out of order / wrong bytes | %d / %d / %d / %d |"
              % (totals["lost"], totals["duplicated"], totals["out_of_order"],
                 totals["wrong_bytes"]),
              "| worker RSS, sum of %d workers (kB): first sample → end of warm-up → end | "
              "%d → %d → %d |" % (WORKERS, start["worker_rss_kb"], first["worker_rss_kb"],
                                  end["worker_rss_kb"]),
              "| worker open fds (sum): first sample → end of warm-up → end (→ once the clients "
              "closed) | %d → %d → %d (→ %d) |" % (start["worker_fds"], first["worker_fds"],
                                                  end["worker_fds"], last["worker_fds"]),
              "| module PostgreSQL connections: first sample → end of warm-up → end (max after "
              "the warm-up) | %s → %s → %s (%d) |" % (start["pg_connections"],
                                                       first["pg_connections"],
                                                       end["pg_connections"], max_pg),
              "| growth: worker RSS kB, median first third → last third | %s |"
              % g("worker_rss_kb"),
              "| growth: worker fds | %s |" % g("worker_fds"),
              "| growth: PostgreSQL connections | %s |" % g("pg_connections"),
              "",
              "Growth rule: the samples after the warm-up are cut in thirds; the last third's "
              "median may exceed the first's by at most 3 %% + 1 MiB (RSS), 5 %% + 2 (fds), "
              "+1 (PostgreSQL connections, never above %d: the listener and %d replay "
              "connections per worker). Samples: `bench/soak.csv`." % (pg_bound,
                                                                        REPLAY_CONNECTIONS), ""]
    if plot_error:
        lines.append("(no plot: %s)" % plot_error)
    else:
        lines.append("![soak](soak.png)")
    for line in lines:
        if line.startswith("|"):
            say(line)
    say("drain %.1fs; %s" % (drain_s, verdict))
    write_section(os.path.join(OUT, "results.md"), "\n".join(lines))
    for b in bad_clients[:8]:
        say("client %d (%r): %s; non-200: %s" % b)

    assert not failures, verdict
    assert out_of_id_order > 0 and big > 0 and len(rolled) > 0, "the mix proved nothing"
