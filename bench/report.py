#!/usr/bin/env python3
"""Turns the raw figures of bench/run.sh into bench/results.md and gnuplot PNGs.

    report.py <meta.json> <results.jsonl> <out-dir>

Each line of results.jsonl is one run of the load client (see loadclient.cpp for the fields),
tagged with its test letter, repetition and size. Figures are medians over the repetitions with
their min-max; ratios are ratios of medians, both systems measured alternately in the same run.
Static findings (profiles, what limits the module) come from bench/findings.md when it exists.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

KB = 1024.0
MB = 1024.0 * 1024.0

# Targets of issue 6.
T_MEM_BYTES = 8 * KB
T_LAT_P99_US = 5000.0
T_LAT_P50_GAP_US = 500.0
T_SUSTAINED_RATIO = 0.9
T_REPLAY_ROWS_S = 100000.0
T_REPLAY_RSS = 16 * MB
T_FILTER_US = 20.0


def load(meta_path, jsonl_path):
    with open(meta_path) as f:
        meta = json.load(f)
    runs = []
    with open(jsonl_path) as f:
        for line in f:
            line = line.strip()
            if line:
                runs.append(json.loads(line))
    return meta, runs


def valid(r):
    """A run counts when every stream opened and every expected delivery arrived. A closed-loop
    run that loses deliveries stalls (the publisher waits for them), so its rate is not a
    sustained rate: such runs are listed under their table, not counted."""
    if r.get("opened", 0) < r.get("conns", 0):
        return False
    if "complete" in r and not r["complete"]:
        return False
    return True


def short(r):
    return ("complete" in r and not r["complete"]) or r.get("opened", 0) < r.get("conns", 0)


def select(runs, test, system=None, n=None):
    out = []
    for r in runs:
        if r.get("test") != test:
            continue
        if system is not None and r.get("system") != system:
            continue
        if n is not None and r.get("n") != n:
            continue
        out.append(r)
    return out


def sub(runs, system=None, n=None):
    return [r for r in runs if (system is None or r.get("system") == system)
            and (n is None or r.get("n") == n)]


class Stat:
    """Median and min-max of one metric over repetitions."""

    def __init__(self, values):
        self.values = [v for v in values if v is not None]
        self.n = len(self.values)
        self.med = statistics.median(self.values) if self.values else None
        self.lo = min(self.values) if self.values else None
        self.hi = max(self.values) if self.values else None

    def fmt(self, fn):
        if self.med is None:
            return "n/a"
        if self.n == 1:
            return fn(self.med)
        return "%s (%s–%s)" % (fn(self.med), fn(self.lo), fn(self.hi))


def metric(runs, key, sub=None):
    vals = []
    for r in runs:
        if not valid(r):
            continue
        v = r.get(key)
        if sub is not None:
            for k in sub:
                v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            vals.append(float(v))
    return Stat(vals)


def f_int(v):
    return "{:,.0f}".format(v)


def f_kb(v):
    return "%.2f KB" % (v / KB)


def f_mb(v):
    return "%.1f MB" % (v / MB)


def f_us(v):
    return "%.2f µs" % v


def f_ms(v):
    return "%.2f ms" % (v / 1000.0)


def f_rate(v):
    if v >= 1e6:
        return "%.2f M/s" % (v / 1e6)
    if v >= 1e3:
        return "%.1f k/s" % (v / 1e3)
    return "%.0f /s" % v


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def f_ratio(x):
    return "n/a" if x is None else "%.2f×" % x


def verdict(met, detail):
    return ("**met**" if met else "**missed**") + (" — " + detail if detail else "")


def incomplete_note(runs):
    out = ""
    for label, rs in (("Excluded runs (streams failed to open, or deliveries never arrived)",
                       [r for r in runs if not valid(r)]),
                      ("Runs counted although some deliveries never arrived",
                       [r for r in runs if valid(r) and short(r)])):
        if not rs:
            continue
        parts = []
        for r in rs:
            why = r.get("error") or r.get("pub_error") or (
                "%s of %s deliveries" % (f_int(r.get("deliveries", 0)), f_int(r.get("expected", 0))))
            parts.append("%s/%s n=%s rep %s: %s" % (r.get("test"), r.get("system"), r.get("n"),
                                                    r.get("rep"), why))
        out += "\n_%s: %s._\n" % (label, "; ".join(parts))
    return out


# ---------------------------------------------------------------------------------------------
# Plots

def gnuplot(script, workdir):
    try:
        subprocess.run(["gnuplot"], input=script.encode(), cwd=workdir, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        return True
    except (subprocess.SubprocessError, OSError) as e:
        sys.stderr.write("report: gnuplot failed: %s\n" % e)
        return False


PCTS = ["50", "75", "90", "95", "99", "99.5", "99.9", "99.99"]


def plot_latency(runs, out_dir, tmp):
    series = []
    for system, n, title in (("module", 1000, "ngx\\_event\\_piper (1,000 streams)"),
                             ("module", 1, "ngx\\_event\\_piper (1 stream)"),
                             ("pg_listen", None, "raw libpq LISTEN (1 connection)"),
                             ("nchan", None, "nchan (1,000 subscribers)")):
        rs = [r for r in select(runs, "c", system, n) if valid(r) and r.get("latency_us")]
        if not rs:
            continue
        path = os.path.join(tmp, "lat_%s_%s.dat" % (system, n))
        with open(path, "w") as f:
            for p in PCTS:
                vals = [r["latency_us"]["pct"][p] for r in rs if p in r["latency_us"]["pct"]]
                if not vals:
                    continue
                import math
                x = -math.log10(1.0 - float(p) / 100.0)
                f.write("%g %g %g %g \"%s\"\n" % (x, statistics.median(vals) / 1000.0,
                                                  min(vals) / 1000.0, max(vals) / 1000.0, p))
        series.append((path, title))
    if not series:
        return None
    png = os.path.join(out_dir, "latency.png")
    plots = ", ".join(
        "'%s' using 1:2:3:4:xticlabels(5) with yerrorlines lw 2 title '%s'" % (p, t)
        for p, t in series)
    script = """
set terminal pngcairo size 900,560 font 'DejaVu Sans,10'
set output '%s'
set title 'Commit-to-receipt latency by percentile (median of repetitions, bars: min-max)'
set xlabel 'percentile'
set ylabel 'latency (ms, log scale)'
set logscale y
set grid
set key top left
plot %s
""" % (png, plots)
    return png if gnuplot(script, tmp) else None


def plot_fanout(runs, out_dir, tmp, key, fname, ylabel, title):
    series = []
    for system, label in (("module", "ngx\\_event\\_piper"), ("nchan", "nchan")):
        sizes = sorted({r["n"] for r in select(runs, "b", system)})
        path = os.path.join(tmp, "%s_%s.dat" % (fname, system))
        rows = 0
        with open(path, "w") as f:
            for n in sizes:
                st = metric(select(runs, "b", system, n), key)
                if st.med is None:
                    continue
                f.write("%d %g %g %g\n" % (n, st.med, st.lo, st.hi))
                rows += 1
        if rows:
            series.append((path, label))
    if not series:
        return None
    png = os.path.join(out_dir, fname + ".png")
    plots = ", ".join("'%s' using 1:2:3:4 with yerrorlines lw 2 title '%s'" % (p, t)
                      for p, t in series)
    script = """
set terminal pngcairo size 900,560 font 'DejaVu Sans,10'
set output '%s'
set title '%s'
set xlabel 'streams receiving each event (one consumer / one channel)'
set ylabel '%s'
set logscale x
set logscale y
set grid
set key top left
plot %s
""" % (png, title, ylabel, plots)
    return png if gnuplot(script, tmp) else None


# ---------------------------------------------------------------------------------------------
# The report

def FILTER_N(runs):
    return next((r.get("n") for r in runs if r.get("part") == "f"), 0) or 0


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: report.py <meta.json> <results.jsonl> <out-dir>")
    meta, runs = load(sys.argv[1], sys.argv[2])
    out_dir = os.path.abspath(sys.argv[3])
    here = os.path.dirname(os.path.abspath(__file__))
    L = []
    targets = []  # (target, measured, verdict)

    kind = "quick run (`--quick`)" if meta.get("quick") else "full run"
    L.append("# ngx_event_piper benchmark results\n")
    L.append("Generated by `bench/run.sh` (%s) on %s, %d repetitions of each measurement, "
             "systems alternated within each repetition; took %d s.\n"
             % (kind, meta.get("date"), meta.get("reps"), meta.get("elapsed_s", 0)))
    L.append("Command: `%s`\n" % meta.get("command"))
    L.append("## Machine and versions\n")
    L.append("| | |\n|---|---|")
    L.append("| CPU | %s, %s cores (nproc) |" % (meta.get("cpu"), meta.get("nproc")))
    L.append("| memory | %.1f GiB |" % (meta.get("mem_kb", 0) / 1024.0 / 1024.0))
    L.append("| kernel | %s |" % meta.get("kernel"))
    L.append("| nginx | %s (/usr/sbin/nginx, Debian), the same binary for both systems |"
             % meta.get("nginx"))
    L.append("| PostgreSQL | %s (private cluster from scripts/pgctl.sh: fsync off, "
             "synchronous_commit off) |" % meta.get("postgresql"))
    L.append("| nchan | libnginx-mod-nchan %s |" % meta.get("nchan"))
    L.append("| module | build/ngx_event_piper_module.so sha256 %s…, tree %s |"
             % (meta.get("module_sha"), meta.get("git")))
    L.append("| nginx settings (both) | worker_processes %s, worker_rlimit_nofile %s, "
             "worker_connections %s, access_log off |"
             % (meta.get("workers"), meta.get("nofile"), int(meta.get("nofile", 0)) - 100))
    L.append("| load | one client process (bench/loadclient.cpp, epoll) on the same 2 cores; "
             "payload %s bytes of JSON carrying its send time |" % meta.get("payload_bytes"))
    L.append("")
    L.append("Every compared figure comes from this one run: medians over the repetitions with "
             "min–max in brackets; a ratio is module ÷ peer of the medians. Server CPU is the sum "
             "over the nginx workers of `/proc/<pid>/schedstat` run time (nanoseconds; "
             "`utime+stime` from `/proc/<pid>/stat` agrees within its 10 ms tick and is in "
             "results.jsonl as `server_cpu_stat_s`), read by the client right before the first "
             "publish and right after the last expected delivery. Memory is the sum of the "
             "workers' RSS (`/proc/<pid>/statm`). The machine is a shared 2-core VM: "
             "absolute numbers move between runs, the side-by-side ratios much less.\n")

    # ---- (a) memory
    ra = select(runs, "a")
    if ra:
        n = ra[0].get("n")
        L.append("## (a) Memory per idle stream\n")
        L.append("%s idle streams opened on a freshly started nginx (one per repetition); "
                 "(sum of worker RSS after − before) ÷ streams. PSS (proportional set size) is "
                 "shown too: nchan keeps part of its state in shared memory. *nginx baseline* is "
                 "the same nginx holding %s plain requests that wait for a request body (no "
                 "module involved): what nginx itself spends on an idle HTTP/1.1 request "
                 "(connection, 1 KB header buffer, request pool). Variant *pool1k* adds "
                 "`request_pool_size 1k;` to both servers (nginx's default is 4k).\n"
                 % (f_int(n), f_int(n)))
        L.append("| settings | ngx_event_piper RSS | nchan RSS | ratio | ngx_event_piper PSS "
                 "| nchan PSS | nginx baseline RSS |")
        L.append("|---|---|---|---|---|---|---|")
        variants = []
        for r in ra:
            v = r.get("variant", "default")
            if v not in variants:
                variants.append(v)
        for v in variants:
            rv = [r for r in ra if r.get("variant", "default") == v]
            m = metric(sub(rv, "module"), "rss_per_stream")
            c = metric(sub(rv, "nchan"), "rss_per_stream")
            mp = metric(sub(rv, "module"), "pss_per_stream")
            cp = metric(sub(rv, "nchan"), "pss_per_stream")
            h = metric(sub(rv, "hold"), "rss_per_stream")
            label = {"default": "stock nginx", "pool1k": "request_pool_size 1k"}.get(v, v)
            L.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                label, m.fmt(f_kb), c.fmt(f_kb), f_ratio(ratio(m.med, c.med)), mp.fmt(f_kb),
                cp.fmt(f_kb), h.fmt(f_kb)))
            if m.med is not None and c.med is not None:
                ok = m.med <= c.med and m.med <= T_MEM_BYTES
                detail = []
                if m.med > T_MEM_BYTES:
                    detail.append("%.2f KB over 8 KB" % ((m.med - T_MEM_BYTES) / KB))
                    if h.med is not None:
                        detail.append("nginx's own idle request is %s here" % f_kb(h.med))
                if m.med > c.med:
                    detail.append("%.2f KB (%.0f%%) over nchan" % ((m.med - c.med) / KB,
                                                                   (m.med / c.med - 1) * 100))
                targets.append(("(a) memory per idle stream ≤ nchan and ≤ 8 KB (%s)" % label,
                                "%s vs nchan %s" % (f_kb(m.med), f_kb(c.med)),
                                verdict(ok, "; ".join(detail))))
        L.append(incomplete_note(ra))

    # ---- (b) fan-out
    rb = select(runs, "b")
    if rb:
        sizes = sorted({r["n"] for r in rb})
        L.append("## (b) Fan-out: one event to N streams of one consumer\n")
        L.append("Closed loop: %s publisher connections (libpq pipeline / HTTP keep-alive, "
                 "pipelined) keep a bounded number of events in flight for %.1f s; "
                 "deliveries/s = deliveries ÷ (last delivery − first publish). The module's "
                 "publisher INSERTs into PostgreSQL; nchan's POSTs to its publisher location, "
                 "so nchan's worker CPU includes receiving the publish while the module's "
                 "does not include PostgreSQL's work.\n"
                 % (meta.get("pub_conns", 2), meta.get("pub_ms", 0) / 1000.0))
        L.append("| streams | deliveries/s module | deliveries/s nchan | ratio | CPU/delivery "
                 "module | CPU/delivery nchan | ratio |")
        L.append("|---|---|---|---|---|---|---|")
        all_dps, all_cpu = True, True
        miss_dps, miss_cpu = [], []
        for n in sizes:
            md = metric(sub(rb, "module", n), "deliveries_per_s")
            cd = metric(sub(rb, "nchan", n), "deliveries_per_s")
            mc = metric(sub(rb, "module", n), "cpu_us_per_delivery")
            cc = metric(sub(rb, "nchan", n), "cpu_us_per_delivery")
            rd, rc = ratio(md.med, cd.med), ratio(mc.med, cc.med)
            L.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                f_int(n), md.fmt(f_rate), cd.fmt(f_rate), f_ratio(rd), mc.fmt(f_us),
                cc.fmt(f_us), f_ratio(rc)))
            if rd is None or rd < 1.0:
                all_dps = False
                miss_dps.append("%s streams: %s of nchan" % (f_int(n), f_ratio(rd)))
            if rc is None or rc > 1.0:
                all_cpu = False
                miss_cpu.append("%s streams: %s of nchan" % (f_int(n), f_ratio(rc)))
        L.append(incomplete_note(rb))
        pub = []
        for n in sizes:
            mp_ = metric(sub(rb, "module", n), "publish_per_s")
            cp_ = metric(sub(rb, "nchan", n), "publish_per_s")
            pub.append("%s: module %s, nchan %s" % (f_int(n), mp_.fmt(f_rate), cp_.fmt(f_rate)))
        L.append("Events published per second (PostgreSQL commits resp. POSTs answered): "
                 + "; ".join(pub) + ".\n")
        L.append("![deliveries per second against stream count](fanout.png)\n")
        L.append("![server CPU per delivery against stream count](fanout_cpu.png)\n")
        targets.append(("(b) deliveries/s ≥ nchan at every stream count",
                        ", ".join("%s: %s" % (f_int(n), f_ratio(ratio(
                            metric(sub(rb, "module", n), "deliveries_per_s").med,
                            metric(sub(rb, "nchan", n), "deliveries_per_s").med)))
                                  for n in sizes),
                        verdict(all_dps, "; ".join(miss_dps))))
        targets.append(("(b) server CPU per delivery ≤ nchan",
                        ", ".join("%s: %s" % (f_int(n), f_ratio(ratio(
                            metric(sub(rb, "module", n), "cpu_us_per_delivery").med,
                            metric(sub(rb, "nchan", n), "cpu_us_per_delivery").med)))
                                  for n in sizes),
                        verdict(all_cpu, "; ".join(miss_cpu))))

    # ---- (c) latency
    rc_ = select(runs, "c")
    if rc_:
        rate = rc_[0].get("rate")
        L.append("## (c) Commit-to-receipt latency at %s events/s (open loop)\n" % rate)
        L.append("The publisher sends one INSERT (autocommit) per event on a fixed schedule, "
                 "putting `clock_gettime(CLOCK_REALTIME)` µs into the payload just before "
                 "sending it; latency = receipt time at the client − that stamp, for every "
                 "delivery. The module serves 1,000 streams of one consumer; the raw listener "
                 "is one libpq connection doing LISTEN (the floor set by PostgreSQL). nchan "
                 "(1,000 subscribers of one channel, POST publisher, no database) is for "
                 "context only.\n")
        L.append("| | p50 | p90 | p99 | p99.9 | max | deliveries |")
        L.append("|---|---|---|---|---|---|---|")
        stats = {}
        big = max([r["n"] for r in sub(rc_, "module")] or [0])
        for key, system, n, label in (
                ("module", "module", big, "ngx_event_piper, %s streams" % f_int(big)),
                ("pg_listen", "pg_listen", None, "raw libpq LISTEN"),
                ("module1", "module", 1, "ngx_event_piper, 1 stream"),
                ("wal", "module_wal", 1, "ngx_event_piper, 1 stream, `event_piper_source wal`"),
                ("nchan", "nchan", None, "nchan, %s subscribers" % f_int(big))):
            if key == "module1" and big == 1:
                continue
            rs = sub(rc_, system, n)
            if not rs:
                continue
            p = {q: metric(rs, "latency_us", ["pct", q]) for q in ("50", "90", "99", "99.9")}
            mx = metric(rs, "latency_us", ["max"])
            dl = metric(rs, "deliveries")
            stats[key] = p
            L.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                label, p["50"].fmt(f_ms), p["90"].fmt(f_ms), p["99"].fmt(f_ms),
                p["99.9"].fmt(f_ms), mx.fmt(f_ms), dl.fmt(f_int)))
        L.append(incomplete_note(rc_))
        L.append("![latency percentiles](latency.png)\n")
        if "wal" in stats:
            L.append("The `event_piper_source wal` row: its own cluster, the same settings but "
                     "`wal_level = logical`, and the publisher's commits with "
                     "`synchronous_commit = on` (logical decoding reads only flushed WAL: with it off, a commit would "
                     "wait up to `wal_writer_delay`, 200 ms, to be decoded; fsync stays off); "
                     "the positioner decodes each commit from the slot, "
                     "gives its position in a transaction of its own and notifies, so its "
                     "latency is the trigger's path plus the positioner's lag.\n")
            p50 = stats["wal"]["50"].med
            if p50 is not None:
                targets.append(("(c) wal: p50 ≤ 3 ms at 1 stream", f_ms(p50),
                                verdict(p50 <= 3000, "" if p50 <= 3000 else
                                        "%s over" % f_ms(p50 - 3000))))
        if "module" in stats:
            p99 = stats["module"]["99"].med
            if p99 is not None:
                targets.append(("(c) p99 ≤ 5 ms (module, 1,000 streams)", f_ms(p99),
                                verdict(p99 <= T_LAT_P99_US,
                                        "" if p99 <= T_LAT_P99_US else
                                        "%s over" % f_ms(p99 - T_LAT_P99_US))))
            if "pg_listen" in stats:
                a, b = stats["module"]["50"].med, stats["pg_listen"]["50"].med
                if a is not None and b is not None:
                    gap = a - b
                    targets.append(("(c) p50 within 0.5 ms of the raw listener",
                                    "%s vs %s (gap %s)" % (f_ms(a), f_ms(b), f_ms(gap)),
                                    verdict(gap <= T_LAT_P50_GAP_US,
                                            "" if gap <= T_LAT_P50_GAP_US else
                                            "gap %s over" % f_ms(gap - T_LAT_P50_GAP_US))))
            if "module1" in stats and "pg_listen" in stats:
                a, b = stats["module1"]["50"].med, stats["pg_listen"]["50"].med
                if a is not None and b is not None:
                    L.append("\nWith a single stream the module adds %s to the raw listener's "
                             "median (%s vs %s): the rest of the gap at %s streams is the "
                             "fan-out itself, one socket write per stream.\n"
                             % (f_ms(a - b), f_ms(a), f_ms(b), f_int(big)))

    # ---- (d) sustained
    rd_ = select(runs, "d")
    if rd_:
        m = metric(sub(rd_, "module"), "deliveries_per_s")
        p = metric(sub(rd_, "pg_listen"), "deliveries_per_s")
        mpub = metric(sub(rd_, "module"), "publish_per_s")
        ppub = metric(sub(rd_, "pg_listen"), "publish_per_s")
        mcpu = metric(sub(rd_, "module"), "cpu_us_per_delivery")
        L.append("## (d) Sustained events/s to one stream\n")
        L.append("The publisher commits as fast as PostgreSQL takes it (%d connections, "
                 "pipelined) for %.1f s; the rate is what one client receives.\n"
                 % (meta.get("pub_conns", 2), meta.get("pub_ms", 0) / 1000.0))
        L.append("| | events/s received | commits/s | worker CPU/event |\n|---|---|---|---|")
        L.append("| ngx_event_piper, 1 stream | %s | %s | %s |" % (m.fmt(f_rate), mpub.fmt(f_rate),
                                                                 mcpu.fmt(f_us)))
        L.append("| raw libpq LISTEN | %s | %s | – |" % (p.fmt(f_rate), ppub.fmt(f_rate)))
        # Both receive exactly what commits, and the commit rate drifts during the run (the
        # table grows): compare the two runs of each repetition, which are back to back.
        pairs = []
        for rep in sorted({x.get("rep") for x in rd_}):
            a = [x for x in sub(rd_, "module") if x.get("rep") == rep and valid(x)]
            b = [x for x in sub(rd_, "pg_listen") if x.get("rep") == rep and valid(x)]
            if a and b and b[0]["deliveries_per_s"] > 0:
                pairs.append(a[0]["deliveries_per_s"] / b[0]["deliveries_per_s"])
        kept = [x["deliveries"] / x["acked"] for x in sub(rd_, "module")
                if valid(x) and x.get("acked")]
        r = statistics.median(pairs) if pairs else ratio(m.med, p.med)
        L.append("\nRatio module ÷ raw listener, median over the repetitions of the two "
                 "back-to-back runs: %s (%s); ratio of the medians: %s. Share of committed "
                 "events the module's stream received: %s. Both are bounded by the commit rate "
                 "(see *What limits the module*, item 1).\n"
                 % (f_ratio(r), ", ".join("%.2f" % x for x in pairs),
                    f_ratio(ratio(m.med, p.med)),
                    "%.1f %%" % (100 * statistics.median(kept)) if kept else "n/a"))
        L.append(incomplete_note(rd_))
        if r is not None:
            targets.append(("(d) sustained ≥ 0.9× the raw listener", f_ratio(r),
                            verdict(r >= T_SUSTAINED_RATIO, "" if r >= T_SUSTAINED_RATIO else
                                    "%.2f below" % (T_SUSTAINED_RATIO - r))))

    # ---- (e) replay
    re_ = select(runs, "e")
    if re_:
        rows = re_[0].get("n")
        rate = metric(re_, "deliveries_per_s")
        growth = metric(re_, "rss_growth")
        cpu = metric(re_, "cpu_us_per_delivery")
        L.append("## (e) Replay of %s stored events to one client\n" % f_int(rows))
        L.append("One stream with `Last-Event-ID: 0` for a consumer with %s stored events "
                 "(loaded once with the trigger bypassed); rows/s = rows ÷ (last row − request "
                 "sent); peak RSS growth = highest sum of worker RSS, sampled every 10 ms, − "
                 "the sum before the request.\n" % f_int(rows))
        L.append("| rows/s | peak worker RSS growth | worker CPU per row |\n|---|---|---|")
        L.append("| %s | %s | %s |" % (rate.fmt(f_rate), growth.fmt(f_mb), cpu.fmt(f_us)))
        L.append(incomplete_note(re_))
        if rate.med is not None:
            targets.append(("(e) replay ≥ 100,000 rows/s", f_rate(rate.med),
                            verdict(rate.med >= T_REPLAY_ROWS_S, "" if rate.med >= T_REPLAY_ROWS_S
                                    else "%.0f%% short" % ((1 - rate.med / T_REPLAY_ROWS_S) * 100))))
        if growth.med is not None:
            targets.append(("(e) peak RSS growth < 16 MB during replay", f_mb(growth.med),
                            verdict(growth.med < T_REPLAY_RSS, "" if growth.med < T_REPLAY_RSS
                                    else "%s over" % f_mb(growth.med - T_REPLAY_RSS))))

    # ---- (f) filtered
    rf = select(runs, "f")
    if rf:
        n = rf[0].get("n")
        m = metric(sub(rf, "module"), "cpu_us_per_event")
        c = metric(sub(rf, "nchan"), "cpu_us_per_event")
        mr = metric(sub(rf, "module"), "deliveries_per_s")
        cr = metric(sub(rf, "nchan"), "deliveries_per_s")
        L.append("## (f) Filtered fan-out: %s streams of %s distinct consumers\n"
                 % (f_int(n), f_int(n)))
        L.append("Each event is addressed to one consumer (round robin), so it matches exactly "
                 "one stream; worker CPU ÷ events. Every module worker receives and parses every "
                 "notification; nchan routes the POST to one channel.\n")
        L.append("| | worker CPU per event | events/s |\n|---|---|---|")
        L.append("| ngx_event_piper | %s | %s |" % (m.fmt(f_us), mr.fmt(f_rate)))
        L.append("| nchan (context) | %s | %s |" % (c.fmt(f_us), cr.fmt(f_rate)))
        L.append("\nRatio module ÷ nchan (CPU per event): %s.\n" % f_ratio(ratio(m.med, c.med)))
        L.append(incomplete_note(rf))
        if m.med is not None:
            targets.append(("(f) ≤ 20 µs worker CPU per matching event", f_us(m.med),
                            verdict(m.med <= T_FILTER_US, "" if m.med <= T_FILTER_US else
                                    "%s over" % f_us(m.med - T_FILTER_US))))

    # ---- (g) several ids per stream: fan-out
    rg = select(runs, "g")
    if rg:
        L.append("## (g) Fan-out to streams of ten ids against single-id streams (issue 13)\n")
        L.append("N streams of the module; `ids10`: each stream carries the ten ids mx0..mx9 "
                 "(`X-Consumer-Groups`) and events are spread over the ten ids; `ids1`: each "
                 "stream carries one id and every event is addressed to it. Every event reaches "
                 "every stream in both; worker CPU ÷ deliveries.\n")
        L.append("| streams | CPU per delivery, 1 id | CPU per delivery, 10 ids | ratio 10 ÷ 1 |"
                 "\n|---|---|---|---|")
        worst = None
        for n in sorted({r.get("n") for r in rg}):
            one = metric([r for r in sub(rg, n=n) if r.get("variant") == "ids1"],
                         "cpu_us_per_delivery")
            ten = metric([r for r in sub(rg, n=n) if r.get("variant") == "ids10"],
                         "cpu_us_per_delivery")
            r = ratio(ten.med, one.med)
            if r is not None:
                worst = r if worst is None else max(worst, r)
            L.append("| %s | %s | %s | %s |" % (f_int(n), one.fmt(f_us), ten.fmt(f_us),
                                                f_ratio(r)))
        L.append("")
        L.append(incomplete_note(rg))
        if worst is not None:
            targets.append(("(g) fan-out CPU per delivery, 10 ids ÷ 1 id ≤ 1.5×", f_ratio(worst),
                            verdict(worst <= 1.5, "" if worst <= 1.5 else
                                    "%.2f over" % (worst - 1.5))))

    # ---- (h) several ids per stream: replay
    rh = select(runs, "h")
    if rh:
        one = metric([r for r in rh if r.get("variant") == "ids1"], "deliveries_per_s")
        ten = metric([r for r in rh if r.get("variant") == "ids10"], "deliveries_per_s")
        g1 = metric([r for r in rh if r.get("variant") == "ids1"], "rss_growth")
        g10 = metric([r for r in rh if r.get("variant") == "ids10"], "rss_growth")
        r = ratio(ten.med, one.med)
        L.append("## (h) Replay to a stream of ten ids against a stream of one id (issue 13)\n")
        L.append("The same number of stored rows (%s): for one id ('replay'), or spread over "
                 "ten ids (rmx0..rmx9) of one stream, whose replay query merges ten index range "
                 "scans (Merge Append).\n" % f_int(rh[0].get("n")))
        L.append("| | rows/s | peak worker RSS growth |\n|---|---|---|")
        L.append("| 1 id | %s | %s |" % (one.fmt(f_rate), g1.fmt(f_mb)))
        L.append("| 10 ids | %s | %s |" % (ten.fmt(f_rate), g10.fmt(f_mb)))
        L.append("\nRatio 10 ids ÷ 1 id (rows/s): %s.\n" % f_ratio(r))
        L.append(incomplete_note(rh))
        if r is not None:
            targets.append(("(h) replay rows/s, 10 ids ÷ 1 id ≥ 0.7×", f_ratio(r),
                            verdict(r >= 0.7, "" if r >= 0.7 else "%.2f below" % (0.7 - r))))

    # ---- (i) issue 12: shared listener against per_worker
    ri = select(runs, "i")
    if ri:
        def part(name, variant):
            return [r for r in ri if r.get("part") == name and r.get("variant") == variant]
        fs, fp = (metric(part("f", v), "cpu_us_per_event") for v in ("shared", "per_worker"))
        cs, cp = (metric(part("c", v), "latency_us", ["pct", "50"]) for v in ("shared",
                                                                              "per_worker"))
        ws, wp = (metric(part("writers", v), "commits_per_s") for v in ("shared", "per_worker"))
        L.append("## (i) One listener per instance (issue 12): `shared` against `per_worker`\n")
        L.append("The same module, the two values of `event_piper_listener`, alternated within "
                 "each repetition (one nginx at a time). *Filtered*: worker CPU per event summed "
                 "over the workers, %s streams of as many consumers (as in (f)). *Latency*: "
                 "commit-to-receipt p50 at 1 stream, %s events/s (as in (c)). *Writers*: "
                 "commits/s of 8 single-row writers (`pgbench -c 8`, the original's insert) "
                 "while 16 or 64 idle sessions LISTEN on `new_events`, standing in for a fleet of "
                 "16 instances × 4 workers (shared: 16 listeners, per_worker: 64); fsync and "
                 "synchronous_commit on for this part, no nginx running.\n"
                 % (f_int(FILTER_N(ri)), meta.get("rate")))
        L.append("| | shared | per_worker | shared ÷ per_worker |\n|---|---|---|---|")
        L.append("| filtered: worker CPU per event | %s | %s | %s |"
                 % (fs.fmt(f_us), fp.fmt(f_us), f_ratio(ratio(fs.med, fp.med))))
        L.append("| latency p50, 1 stream | %s | %s | %s |"
                 % (cs.fmt(f_ms), cp.fmt(f_ms), f_ratio(ratio(cs.med, cp.med))))
        L.append("| writers: commits/s (16 vs 64 listeners) | %s | %s | %s |"
                 % (ws.fmt(f_rate), wp.fmt(f_rate), f_ratio(ratio(ws.med, wp.med))))
        L.append("")
        L.append(incomplete_note([r for r in ri if r.get("part") != "writers"]))
        if fs.med is not None:
            targets.append(("(i) shared: ≤ 20 µs worker CPU per event at 10,000 consumers",
                            f_us(fs.med), verdict(fs.med <= T_FILTER_US, "" if fs.med <= T_FILTER_US
                                                  else "%s over" % f_us(fs.med - T_FILTER_US))))
        if cs.med is not None and cp.med is not None:
            gap = cs.med - cp.med
            targets.append(("(i) shared p50 within 0.2 ms of per_worker (1 stream)",
                            "%s vs %s" % (f_ms(cs.med), f_ms(cp.med)),
                            verdict(gap <= 200.0, "" if gap <= 200.0 else
                                    "%s over" % f_ms(gap - 200.0))))
        if ws.med is not None and wp.med is not None:
            targets.append(("(i) writers: commits/s with 16 listeners (shared) vs 64 (per_worker)",
                            "%s vs %s" % (f_rate(ws.med), f_rate(wp.med)),
                            verdict(ws.med >= wp.med, "")))

    # ---- (j) issue 20: latency while the listener checks a large table
    rj = [r for r in select(runs, "j") if r.get("part") != "status"]
    if rj:
        unpositioned = {r.get("rep"): r.get("unpositioned_rows")
                        for r in select(runs, "j") if r.get("part") == "status"}
        L.append("## (j) Latency while the listener checks a large table (issue 20)\n")
        L.append("1 stream of the module, %s events/s for %s s, on a table of %s events of which "
                 "one never got a position (5,000 ids below the newest, among those the "
                 "listener's first check reads); nginx restarted before each repetition, the default "
                 "`event_piper_listener_timeout` (60 s: a check every 20 s, so each repetition "
                 "spans at least two). Commit-to-receipt latency as in (c); `unpositioned_rows` "
                 "is read from `/status` after each repetition (1 expected).\n"
                 % (rj[0].get("rate"), int(meta.get("stall_ms", 60000)) // 1000,
                    f_int(rj[0].get("rows"))))
        L.append("| repetition | p50 | p99 | p99.9 | max | deliveries | unpositioned_rows |")
        L.append("|---|---|---|---|---|---|---|")

        def lat(r, q):
            v = r.get("latency_us") or {}
            return v.get("max") if q == "max" else (v.get("pct") or {}).get(q)

        def na(fn, v):
            return "n/a" if v is None else fn(v)
        for r in sorted(rj, key=lambda r: r.get("rep", 0)):
            L.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                r.get("rep"), na(f_ms, lat(r, "50")), na(f_ms, lat(r, "99")),
                na(f_ms, lat(r, "99.9")), na(f_ms, lat(r, "max")),
                na(f_int, r.get("deliveries")), unpositioned.get(r.get("rep"), "?")))
        p999 = metric(rj, "latency_us", ["pct", "99.9"])
        mx = metric(rj, "latency_us", ["max"])
        L.append("| median (min–max) | %s | %s | %s | %s | | |" % (
            metric(rj, "latency_us", ["pct", "50"]).fmt(f_ms),
            metric(rj, "latency_us", ["pct", "99"]).fmt(f_ms), p999.fmt(f_ms), mx.fmt(f_ms)))
        L.append("")
        L.append(incomplete_note(rj))
        worst_p999 = max((lat(r, "99.9") for r in rj if lat(r, "99.9") is not None),
                         default=None)
        worst_max = max((lat(r, "max") for r in rj if lat(r, "max") is not None), default=None)
        if worst_p999 is not None:
            targets.append(("(j) large table, 1 stream: p99.9 ≤ 5 ms (worst repetition)",
                            "%s (median %s)" % (f_ms(worst_p999), p999.fmt(f_ms)),
                            verdict(worst_p999 <= 5000.0, "" if worst_p999 <= 5000.0 else
                                    "%s over" % f_ms(worst_p999 - 5000.0))))
        if worst_max is not None:
            targets.append(("(j) large table, 1 stream: max ≤ 20 ms (worst repetition)",
                            "%s (median %s)" % (f_ms(worst_max), mx.fmt(f_ms)),
                            verdict(worst_max <= 20000.0, "" if worst_max <= 20000.0 else
                                    "%s over" % f_ms(worst_max - 20000.0))))

    # ---- plots
    with tempfile.TemporaryDirectory() as tmp:
        if rc_:
            plot_latency(runs, out_dir, tmp)
        if rb:
            plot_fanout(runs, out_dir, tmp, "deliveries_per_s", "fanout", "deliveries per second",
                        "Deliveries per second against stream count (median, bars: min-max)")
            plot_fanout(runs, out_dir, tmp, "cpu_us_per_delivery", "fanout_cpu",
                        "worker CPU per delivery (µs)",
                        "Server CPU per delivery against stream count (median, bars: min-max)")

    # ---- summary first
    head = L[:]
    S = ["## Targets (issues 6, 12, 13 and 20)\n", "| target | measured (median) | verdict |", "|---|---|---|"]
    for t, v, ok in targets:
        S.append("| %s | %s | %s |" % (t, v, ok))
    S.append("")
    # Insert the summary after the machine section (before the first measurement section).
    idx = next((i for i, l in enumerate(head) if l.startswith("## (")), len(head))
    L = head[:idx] + S + head[idx:]

    findings = os.path.join(here, "findings.md")
    if os.path.exists(findings):
        with open(findings) as f:
            L.append(f.read())
    L.append("\nRaw figures: `bench/results.jsonl` (one JSON object per client run), "
             "parameters: `bench/results-meta.json`.\n")
    # Keep the writer section of bench/writers.sh (report_writers.py owns it) and the soak's
    # (make soak, tests/integration/soak_chaos.py).
    path = os.path.join(out_dir, "results.md")
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    for begin, end in (("<!-- writers:begin", "<!-- writers:end -->"),
                       ("<!-- soak:begin", "<!-- soak:end -->")):
        if begin in old and end in old:
            L.append(begin + old.split(begin, 1)[1].split(end, 1)[0] + end + "\n")
    with open(path, "w") as f:
        f.write("\n".join(L))


if __name__ == "__main__":
    main()
