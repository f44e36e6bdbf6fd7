// loadclient: the load generator and measuring client of the ngx_event_piper benchmark suite.
//
// One process, one epoll loop for every receiving socket (SSE streams or a raw libpq LISTEN
// connection), plus one publisher thread (libpq pipeline mode for PostgreSQL, pipelined HTTP/1.1
// POSTs for nchan). It also samples the CPU time and RSS of the nginx workers it is given, at
// the exact moments that bound a measurement, and prints one JSON object per run on stdout.
//
//   loadclient stream --host H --port P --system module|nchan --conns N [options]
//   loadclient listen --pg-conninfo C [options]          (raw LISTEN client: the PostgreSQL floor)
//
// Payloads carry their send time: {"t":<CLOCK_REALTIME microseconds>,"s":<seq>,"p":"xx.."}.
// Latency is receipt time minus "t" (same clock, same machine).
//
// Every loop is bounded in count and in time; only loopback addresses are used.
// Build: g++ -std=c++17 -O2 -pthread loadclient.cpp -o loadclient -I/usr/include/postgresql -lpq

#include <libpq-fe.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cinttypes>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// Small utilities

int64_t now_us() { // wall clock, as put into payloads
    timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return int64_t(ts.tv_sec) * 1000000 + ts.tv_nsec / 1000;
}

int64_t mono_us() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return int64_t(ts.tv_sec) * 1000000 + ts.tv_nsec / 1000;
}

[[noreturn]] void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("loadclient: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

void logf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("loadclient: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

std::string fmt_id(const std::string &pattern, uint64_t i) {
    // "%d" in the pattern becomes i; no %d: the pattern itself.
    size_t at = pattern.find("%d");
    if (at == std::string::npos) {
        return pattern;
    }
    return pattern.substr(0, at) + std::to_string(i) + pattern.substr(at + 2);
}

std::string json_escape(const std::string &s) {
    std::string out;
    for (char c : s) {
        if (c == '"' || c == '\\') {
            out.push_back('\\');
            out.push_back(c);
        } else if (static_cast<unsigned char>(c) < 0x20) {
            char b[8];
            snprintf(b, sizeof b, "\\u%04x", c);
            out += b;
        } else {
            out.push_back(c);
        }
    }
    return out;
}

// Finds "t": in a payload and parses the microseconds after it (spaces allowed: jsonb::text).
int64_t parse_t(const char *p, size_t n) {
    const char *end = p + n;
    const char *q = static_cast<const char *>(memmem(p, n, "\"t\":", 4));
    if (q == nullptr) {
        return -1;
    }
    q += 4;
    while (q < end && *q == ' ') {
        ++q;
    }
    int64_t v = 0;
    int digits = 0;
    while (q < end && *q >= '0' && *q <= '9' && digits < 19) {
        v = v * 10 + (*q - '0');
        ++q;
        ++digits;
    }
    return digits > 0 ? v : -1;
}

// ---------------------------------------------------------------------------------------------
// nginx worker probes: CPU from /proc/<pid>/schedstat (ns) and /proc/<pid>/stat (utime+stime),
// RSS from /proc/<pid>/statm, PSS from /proc/<pid>/smaps_rollup.

struct ProcSample {
    uint64_t sched_ns = 0; // sum over pids
    uint64_t stat_ticks = 0;
    uint64_t rss_bytes = 0;
};

bool read_small(const char *path, char *buf, size_t cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return false;
    }
    ssize_t n = read(fd, buf, cap - 1);
    close(fd);
    if (n <= 0) {
        return false;
    }
    buf[n] = 0;
    return true;
}

ProcSample sample_procs(const std::vector<int> &pids, bool rss_only = false) {
    static long page = sysconf(_SC_PAGESIZE);
    ProcSample s;
    char path[64], buf[1024];
    for (int pid : pids) {
        snprintf(path, sizeof path, "/proc/%d/statm", pid);
        if (read_small(path, buf, sizeof buf)) {
            unsigned long size = 0, res = 0;
            if (sscanf(buf, "%lu %lu", &size, &res) == 2) {
                s.rss_bytes += uint64_t(res) * uint64_t(page);
            }
        }
        if (rss_only) {
            continue;
        }
        snprintf(path, sizeof path, "/proc/%d/schedstat", pid);
        if (read_small(path, buf, sizeof buf)) {
            s.sched_ns += strtoull(buf, nullptr, 10);
        }
        snprintf(path, sizeof path, "/proc/%d/stat", pid);
        if (read_small(path, buf, sizeof buf)) {
            // Fields after the ")" of comm: state(3) ... utime(14) stime(15).
            const char *p = strrchr(buf, ')');
            if (p != nullptr) {
                unsigned long long ut = 0, st = 0;
                int field = 2;
                for (const char *q = p + 1; *q && field < 15; ++q) {
                    if (*q == ' ') {
                        ++field;
                        if (field == 14) {
                            ut = strtoull(q + 1, nullptr, 10);
                        } else if (field == 15) {
                            st = strtoull(q + 1, nullptr, 10);
                        }
                    }
                }
                s.stat_ticks += ut + st;
            }
        }
    }
    return s;
}

uint64_t sample_pss(const std::vector<int> &pids) {
    uint64_t total_kb = 0;
    char path[64];
    for (int pid : pids) {
        snprintf(path, sizeof path, "/proc/%d/smaps_rollup", pid);
        FILE *f = fopen(path, "r");
        if (f == nullptr) {
            continue;
        }
        char line[256];
        for (int i = 0; i < 64 && fgets(line, sizeof line, f); ++i) {
            unsigned long kb;
            if (sscanf(line, "Pss: %lu kB", &kb) == 1) {
                total_kb += kb;
                break;
            }
        }
        fclose(f);
    }
    return total_kb * 1024;
}

// ---------------------------------------------------------------------------------------------
// Options

struct Options {
    std::string mode;          // stream | listen
    std::string system = "module";
    std::string host = "127.0.0.1";
    int port = 0;
    std::string path = "/events";          // module
    std::string sub_path = "/sub/%s";      // nchan subscriber, %s = channel
    std::string consumer = "bench";        // consumer / channel pattern, %d = index
    uint64_t consumers = 1;                // conn i uses consumer (i % consumers)
    uint64_t conns = 1;
    int sources = 4;                       // 127.0.0.1 .. 127.0.0.<sources>
    std::string last_event_id;             // sent when non-empty
    std::string groups;                    // X-Consumer-Groups when non-empty (several ids)
    std::vector<int> pids;                 // nginx workers to probe
    int64_t connect_timeout_ms = 60000;
    int max_connecting = 256;
    int64_t hold_ms = 0;                   // idle time after all streams are open
    bool memory = false;                   // report RSS/PSS after hold
    std::string publish = "none";          // none | pg | http
    std::string pg_conninfo;
    std::string pub_path = "/pub/%s";      // nchan publisher, %s = channel
    std::string pub_consumer;              // pattern; default: same as consumer
    uint64_t pub_consumers = 1;            // event k goes to (k % pub_consumers)
    uint64_t events = 1000000;             // publish at most this many
    int64_t duration_ms = 3000;            // publish for at most this long
    double rate = 0;                       // open loop events/s; 0: closed loop (window)
    uint64_t window = 64;                  // events not fully delivered, closed loop
    uint64_t pipeline = 64;                // requests in flight on each publisher connection
    int pub_conns = 1;                     // publisher connections (one thread each)
    int payload_bytes = 100;
    double per_event = -1;                 // deliveries expected per event (default conns/consumers)
    int64_t drain_ms = 10000;              // wait for deliveries after the last publish
    uint64_t expect_events = 0;            // replay: stop once this many events were received
    int64_t run_ms = 0;                    // replay: hard time limit
    bool latency = true;
    // The pg publisher's synchronous_commit: off (no wait for the WAL flush, as the throughput
    // tests want); on for event_piper_source wal, which decodes only flushed WAL.
    std::string pub_synchronous_commit = "off";
    std::string tags;                      // raw JSON fragment copied into the output
};

Options parse_args(int argc, char **argv) {
    Options o;
    if (argc < 2) {
        die("usage: loadclient stream|listen [--option value]... (see bench/README.md)");
    }
    o.mode = argv[1];
    if (o.mode != "stream" && o.mode != "listen") {
        die("unknown mode %s", argv[1]);
    }
    for (int i = 2; i < argc; ++i) {
        std::string k = argv[i];
        auto val = [&]() -> std::string {
            if (i + 1 >= argc) {
                die("%s needs a value", k.c_str());
            }
            return argv[++i];
        };
        if (k == "--system") o.system = val();
        else if (k == "--host") o.host = val();
        else if (k == "--port") o.port = atoi(val().c_str());
        else if (k == "--path") o.path = val();
        else if (k == "--sub-path") o.sub_path = val();
        else if (k == "--consumer") o.consumer = val();
        else if (k == "--consumers") o.consumers = strtoull(val().c_str(), nullptr, 10);
        else if (k == "--conns") o.conns = strtoull(val().c_str(), nullptr, 10);
        else if (k == "--sources") o.sources = atoi(val().c_str());
        else if (k == "--last-event-id") o.last_event_id = val();
        else if (k == "--groups") o.groups = val();
        else if (k == "--pids") {
            std::string v = val();
            for (char *p = &v[0]; *p;) {
                char *end;
                long pid = strtol(p, &end, 10);
                if (end == p) { ++p; continue; }
                o.pids.push_back(int(pid));
                p = end;
            }
        }
        else if (k == "--connect-timeout-ms") o.connect_timeout_ms = atoll(val().c_str());
        else if (k == "--max-connecting") o.max_connecting = atoi(val().c_str());
        else if (k == "--hold-ms") o.hold_ms = atoll(val().c_str());
        else if (k == "--memory") o.memory = true;
        else if (k == "--publish") o.publish = val();
        else if (k == "--pg-conninfo") o.pg_conninfo = val();
        else if (k == "--pub-path") o.pub_path = val();
        else if (k == "--pub-consumer") o.pub_consumer = val();
        else if (k == "--pub-consumers") o.pub_consumers = strtoull(val().c_str(), nullptr, 10);
        else if (k == "--events") o.events = strtoull(val().c_str(), nullptr, 10);
        else if (k == "--duration-ms") o.duration_ms = atoll(val().c_str());
        else if (k == "--rate") o.rate = atof(val().c_str());
        else if (k == "--window") o.window = strtoull(val().c_str(), nullptr, 10);
        else if (k == "--pipeline") o.pipeline = strtoull(val().c_str(), nullptr, 10);
        else if (k == "--pub-conns") o.pub_conns = atoi(val().c_str());
        else if (k == "--payload-bytes") o.payload_bytes = atoi(val().c_str());
        else if (k == "--per-event") o.per_event = atof(val().c_str());
        else if (k == "--drain-ms") o.drain_ms = atoll(val().c_str());
        else if (k == "--expect-events") o.expect_events = strtoull(val().c_str(), nullptr, 10);
        else if (k == "--run-ms") o.run_ms = atoll(val().c_str());
        else if (k == "--no-latency") o.latency = false;
        else if (k == "--pub-synchronous-commit") o.pub_synchronous_commit = val();
        else if (k == "--tags") o.tags = val();
        else die("unknown option %s", k.c_str());
    }
    if (o.pub_consumer.empty()) o.pub_consumer = o.consumer;
    if (o.consumers == 0) o.consumers = 1;
    if (o.pub_consumers == 0) o.pub_consumers = 1;
    if (o.sources < 1 || o.sources > 250) die("--sources must be 1..250");
    if (o.conns > 100000) die("--conns too large");
    if (o.per_event < 0) {
        o.per_event = o.mode == "listen" ? 1.0 : double(o.conns) / double(o.consumers);
    }
    if (o.pipeline == 0) o.pipeline = 1;
    if (o.pub_conns < 1 || o.pub_conns > 16) die("--pub-conns must be 1..16");
    if (o.window == 0) o.window = 1;
    if (o.duration_ms > 600000) o.duration_ms = 600000;
    if (o.drain_ms > 600000) o.drain_ms = 600000;
    return o;
}

// ---------------------------------------------------------------------------------------------
// Shared counters between the receiving loop and the publisher thread

struct Shared {
    std::atomic<uint64_t> received{0};   // deliveries (events counted at any receiver)
    std::atomic<uint64_t> published{0};  // publish requests sent
    std::atomic<uint64_t> acked{0};      // publish requests acknowledged (committed / 2xx)
    std::atomic<uint64_t> pub_errors{0};
    std::atomic<bool> pub_done{false};
    std::atomic<bool> stop{false};
    std::atomic<int64_t> first_pub_mono{0};
    std::atomic<int64_t> last_pub_mono{0};
    std::mutex mu;
    std::string pub_error_text;          // first error
    void error(const std::string &e) {
        std::lock_guard<std::mutex> lock(mu);
        if (pub_errors++ == 0) pub_error_text = e;
    }
};

std::string make_payload(int64_t t, uint64_t seq, int pad_target) {
    char head[96];
    int n = snprintf(head, sizeof head, "{\"t\":%" PRId64 ",\"s\":%" PRIu64 ",\"p\":\"", t, seq);
    std::string p(head, size_t(n));
    int pad = pad_target - n - 2;
    if (pad > 0) {
        p.append(size_t(pad), 'x');
    }
    p += "\"}";
    return p;
}

// Pacing shared by the publisher threads (thread k of P). Returns true when the next event may
// be sent now; otherwise sets *wait_us to how long to wait (bounded).
struct Pacer {
    const Options &o;
    Shared &sh;
    int k = 0, P = 1;
    int64_t start_mono = 0;
    uint64_t sent = 0; // by this thread

    bool may_send(uint64_t in_pipeline, int64_t *wait_us) {
        *wait_us = 1000;
        if (in_pipeline >= o.pipeline || sh.published.load(std::memory_order_relaxed) >= o.events) {
            return false;
        }
        if (o.rate > 0) {
            // Thread k sends events k, k+P, k+2P... of one global open-loop schedule.
            int64_t due = start_mono + int64_t(double(sent * uint64_t(P) + uint64_t(k)) * 1e6 / o.rate);
            int64_t now = mono_us();
            if (now < due) {
                *wait_us = std::min<int64_t>(due - now, 1000);
                return false;
            }
            return true;
        }
        // Closed loop: at most `window` events not yet fully delivered (all threads together).
        double delivered_events = double(sh.received.load(std::memory_order_relaxed)) / o.per_event;
        if (double(sh.published.load(std::memory_order_relaxed)) - delivered_events >= double(o.window)) {
            *wait_us = 100;
            return false;
        }
        return true;
    }

    // Reserves the global sequence number of the next event.
    uint64_t take() {
        ++sent;
        uint64_t seq = sh.published.fetch_add(1, std::memory_order_relaxed);
        int64_t zero = 0;
        sh.first_pub_mono.compare_exchange_strong(zero, mono_us());
        return seq;
    }
};

// libpq publisher: pipeline mode, each insert its own implicit transaction (Sync after each).
void pg_publisher(const Options &o, Shared &sh, Pacer pacer) {
    PGconn *c = PQconnectdb(o.pg_conninfo.c_str());
    auto fail = [&](const std::string &why) {
        sh.error(why);
        if (c) PQfinish(c);
    };
    if (PQstatus(c) != CONNECTION_OK) {
        return fail(std::string("publisher connect: ") + PQerrorMessage(c));
    }
    if (o.pub_synchronous_commit != "on" && o.pub_synchronous_commit != "off") {
        return fail("--pub-synchronous-commit is on or off");
    }
    PGresult *r = PQexec(c, ("SET synchronous_commit = " + o.pub_synchronous_commit).c_str());
    PQclear(r);
    r = PQprepare(c, "ins",
                  "insert into events (type, timestamp, subscriber, payload) "
                  "values ('bench', now(), $1, $2::jsonb)",
                  2, nullptr);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        std::string e = PQresultErrorMessage(r);
        PQclear(r);
        return fail("prepare: " + e);
    }
    PQclear(r);
    if (PQsetnonblocking(c, 1) != 0 || PQenterPipelineMode(c) != 1) {
        return fail("pipeline mode unavailable");
    }
    std::vector<std::string> subs(std::min<uint64_t>(o.pub_consumers, 100000));
    for (size_t i = 0; i < subs.size(); ++i) subs[i] = fmt_id(o.pub_consumer, i);

    pacer.start_mono = mono_us();
    int64_t end = pacer.start_mono + o.duration_ms * 1000;
    uint64_t in_pipe = 0;
    bool sending = true;
    int fd = PQsocket(c);
    // Bounded: time (duration + drain) and count (events).
    int64_t hard_end = end + o.drain_ms * 1000 + 5000000;
    while (!sh.stop.load()) {
        int64_t now = mono_us();
        if (now > hard_end) break;
        if (sending && (sh.published.load() >= o.events || now >= end)) sending = false;
        if (!sending && in_pipe == 0) break;
        int64_t wait_us = 1000;
        int burst = 0;
        while (sending && burst < 64 && pacer.may_send(in_pipe, &wait_us)) {
            uint64_t seq = pacer.take();
            std::string payload = make_payload(now_us(), seq, o.payload_bytes);
            const std::string &sub = subs[seq % subs.size()];
            const char *vals[2] = {sub.c_str(), payload.c_str()};
            if (PQsendQueryPrepared(c, "ins", 2, vals, nullptr, nullptr, 0) != 1 ||
                PQpipelineSync(c) != 1) {
                return fail(std::string("send: ") + PQerrorMessage(c));
            }
            in_pipe++;
            ++burst;
        }
        bool more = sending && burst >= 64;
        int fl = PQflush(c);
        if (fl < 0) return fail(std::string("flush: ") + PQerrorMessage(c));
        pollfd pfd{fd, short(POLLIN | (fl == 1 ? POLLOUT : 0)), 0};
        timespec ts{0, more ? 0 : long(std::max<int64_t>(wait_us, 20)) * 1000};
        if (ppoll(&pfd, 1, &ts, nullptr) < 0 && errno != EINTR) return fail("poll");
        if (PQconsumeInput(c) != 1) return fail(std::string("consume: ") + PQerrorMessage(c));
        for (int guard = 0; in_pipe > 0 && !PQisBusy(c) && guard < 100000; ++guard) {
            PGresult *res = PQgetResult(c);
            if (res == nullptr) continue;
            ExecStatusType st = PQresultStatus(res);
            if (st == PGRES_PIPELINE_SYNC) {
                --in_pipe;
                sh.acked++;
                sh.last_pub_mono = mono_us();
            } else if (st != PGRES_COMMAND_OK) {
                sh.error(PQresultErrorMessage(res));
            }
            PQclear(res);
        }
    }
    PQfinish(c);
}

// HTTP publisher for nchan: one keep-alive connection, pipelined POSTs.
void http_publisher(const Options &o, Shared &sh, Pacer pacer) {
    auto fail = [&](const std::string &why) {
        sh.error(why);
    };
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(uint16_t(o.port));
    inet_pton(AF_INET, o.host.c_str(), &sa.sin_addr);
    if (connect(fd, reinterpret_cast<sockaddr *>(&sa), sizeof sa) != 0) {
        close(fd);
        return fail(std::string("publisher connect: ") + strerror(errno));
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    std::vector<std::string> paths(std::min<uint64_t>(o.pub_consumers, 100000));
    for (size_t i = 0; i < paths.size(); ++i) {
        std::string chan = fmt_id(o.pub_consumer, i);
        std::string p = o.pub_path;
        size_t at = p.find("%s");
        if (at != std::string::npos) p = p.substr(0, at) + chan + p.substr(at + 2);
        paths[i] = p;
    }
    pacer.start_mono = mono_us();
    int64_t end = pacer.start_mono + o.duration_ms * 1000;
    int64_t hard_end = end + o.drain_ms * 1000 + 5000000;
    uint64_t in_pipe = 0;
    bool sending = true;
    std::string out, in;
    size_t out_off = 0;
    char buf[65536];
    while (!sh.stop.load()) {
        int64_t now = mono_us();
        if (now > hard_end) break;
        if (sending && (sh.published.load() >= o.events || now >= end)) sending = false;
        if (!sending && in_pipe == 0) break;
        int64_t wait_us = 1000;
        int burst = 0;
        while (sending && burst < 64 && pacer.may_send(in_pipe, &wait_us)) {
            uint64_t seq = pacer.take();
            std::string payload = make_payload(now_us(), seq, o.payload_bytes);
            char head[512];
            int n = snprintf(head, sizeof head,
                             "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                             "Content-Length: %zu\r\n\r\n",
                             paths[seq % paths.size()].c_str(), o.host.c_str(), payload.size());
            out.append(head, size_t(n));
            out += payload;
            in_pipe++;
            ++burst;
        }
        bool more = sending && burst >= 64;
        while (out_off < out.size()) {
            ssize_t w = send(fd, out.data() + out_off, out.size() - out_off, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EAGAIN || errno == EINTR) break;
                close(fd);
                return fail(std::string("publisher send: ") + strerror(errno));
            }
            out_off += size_t(w);
        }
        if (out_off == out.size()) {
            out.clear();
            out_off = 0;
        }
        pollfd pfd{fd, short(POLLIN | (out.empty() ? 0 : POLLOUT)), 0};
        timespec ts{0, more ? 0 : long(std::max<int64_t>(wait_us, 20)) * 1000};
        ppoll(&pfd, 1, &ts, nullptr);
        for (int guard = 0; guard < 64; ++guard) {
            ssize_t r = recv(fd, buf, sizeof buf, 0);
            if (r > 0) {
                in.append(buf, size_t(r));
                continue;
            }
            if (r == 0) {
                close(fd);
                return fail("publisher: server closed the connection");
            }
            break;
        }
        // Parse complete responses: status line, headers, Content-Length body.
        size_t pos = 0;
        for (int guard = 0; guard < 100000; ++guard) {
            size_t he = in.find("\r\n\r\n", pos);
            if (he == std::string::npos) break;
            int status = atoi(in.c_str() + pos + 9);
            size_t cl = 0;
            size_t hp = pos;
            while (hp < he) {
                size_t le = in.find("\r\n", hp);
                if (strncasecmp(in.c_str() + hp, "content-length:", 15) == 0) {
                    cl = strtoull(in.c_str() + hp + 15, nullptr, 10);
                }
                hp = le + 2;
            }
            if (in.size() < he + 4 + cl) break;
            pos = he + 4 + cl;
            --in_pipe;
            if (status >= 200 && status < 300) {
                sh.acked++;
                sh.last_pub_mono = mono_us();
            } else {
                sh.error("publisher got HTTP " + std::to_string(status));
            }
        }
        if (pos > 0) in.erase(0, pos);
    }
    close(fd);
}

// ---------------------------------------------------------------------------------------------
// Receivers

struct Stats {
    uint64_t events = 0;        // deliveries counted
    uint64_t heartbeats = 0;
    uint64_t bytes = 0;
    uint64_t reads = 0;
    int64_t first_recv_mono = 0;
    int64_t last_recv_mono = 0;
    int64_t last_id = -1;
    std::vector<int32_t> lat;   // microseconds
    size_t lat_cap = 20000000;
    uint64_t lat_dropped = 0;
};

// One SSE stream over HTTP/1.1 (chunked or not).
struct Conn {
    int fd = -1;
    uint32_t idx = 0;
    uint8_t state = 0;     // 0 connecting, 1 reading headers, 2 body, 3 closed
    bool chunked = false;
    uint8_t cstate = 0;    // chunk parser: 0 size, 1 data, 2 data CRLF
    bool cext = false;     // skipping a chunk extension
    bool ev_data = false;
    bool ev_heartbeat = false;
    int64_t ev_t = -1;
    int64_t ev_id = -1;
    uint64_t chunk_left = 0;
    std::string hdr;       // response head while reading it
    std::string line;      // partial SSE line
};

class Receiver {
public:
    Receiver(const Options &o, Shared &sh) : o_(o), sh_(sh) {
        ep_ = epoll_create1(EPOLL_CLOEXEC);
        if (ep_ < 0) die("epoll_create1: %s", strerror(errno));
        st_.lat.reserve(o.latency ? 1 << 20 : 0);
    }

    Stats st_;
    uint64_t ok = 0, failed = 0, closed_early = 0;
    int first_status_fail = 0;
    std::string first_error;

    // Opens every stream, at most max_connecting in flight. Returns when all answered or timeout.
    void open_all() {
        conns_.resize(o_.conns);
        for (uint64_t i = 0; i < o_.conns; ++i) conns_[i].idx = uint32_t(i);
        uint64_t next = 0, inflight = 0;
        int64_t deadline = mono_us() + o_.connect_timeout_ms * 1000;
        while (ok + failed < o_.conns && mono_us() < deadline) {
            while (next < o_.conns && inflight < uint64_t(o_.max_connecting)) {
                if (start_conn(conns_[next])) ++inflight;
                ++next;
            }
            uint64_t before = ok + failed;
            poll_once(10);
            inflight -= std::min(inflight, (ok + failed) - before);
        }
        if (ok + failed < o_.conns) {
            note_error("timeout opening streams");
        }
    }

    void open_listen() {
        pg_ = PQconnectdb(o_.pg_conninfo.c_str());
        if (PQstatus(pg_) != CONNECTION_OK) die("listen connect: %s", PQerrorMessage(pg_));
        PGresult *r = PQexec(pg_, "LISTEN new_events");
        if (PQresultStatus(r) != PGRES_COMMAND_OK) die("LISTEN: %s", PQresultErrorMessage(r));
        PQclear(r);
        PQsetnonblocking(pg_, 1);
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = UINT64_MAX;
        epoll_ctl(ep_, EPOLL_CTL_ADD, PQsocket(pg_), &ev);
        ok = 1;
    }

    // One epoll round.
    void poll_once(int timeout_ms) {
        epoll_event evs[1024];
        int n = epoll_wait(ep_, evs, 1024, timeout_ms);
        if (n <= 0) return;
        int64_t t = o_.latency ? now_us() : 0;
        int64_t m = mono_us();
        for (int i = 0; i < n; ++i) {
            if (evs[i].data.u64 == UINT64_MAX) {
                on_pg(t, m);
                continue;
            }
            Conn &c = conns_[evs[i].data.u64];
            if (c.state == 0) {
                on_connected(c, evs[i].events);
            } else if (c.state == 1 || c.state == 2) {
                on_readable(c, t, m);
            }
        }
    }

    void close_all() {
        for (Conn &c : conns_) {
            if (c.fd >= 0) {
                linger lg{1, 0}; // RST: no TIME_WAIT pile-up across repetitions
                setsockopt(c.fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
                close(c.fd);
                c.fd = -1;
            }
        }
        if (pg_) {
            PQfinish(pg_);
            pg_ = nullptr;
        }
    }

private:
    void note_error(const std::string &e) {
        if (first_error.empty()) first_error = e;
    }

    bool start_conn(Conn &c) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            ++failed;
            note_error(std::string("socket: ") + strerror(errno));
            return false;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        // Spread over several loopback source addresses, so ephemeral ports never run short.
        if (o_.sources > 1) {
            setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
            sockaddr_in src{};
            src.sin_family = AF_INET;
            src.sin_addr.s_addr = htonl((127u << 24) | uint32_t(1 + c.idx % uint32_t(o_.sources)));
            if (bind(fd, reinterpret_cast<sockaddr *>(&src), sizeof src) != 0) {
                note_error(std::string("bind: ") + strerror(errno));
            }
        }
        sockaddr_in sa{};
        sa.sin_family = AF_INET;
        sa.sin_port = htons(uint16_t(o_.port));
        inet_pton(AF_INET, o_.host.c_str(), &sa.sin_addr);
        int rc = connect(fd, reinterpret_cast<sockaddr *>(&sa), sizeof sa);
        if (rc != 0 && errno != EINPROGRESS) {
            ++failed;
            note_error(std::string("connect: ") + strerror(errno));
            close(fd);
            return false;
        }
        c.fd = fd;
        c.state = 0;
        epoll_event ev{};
        ev.events = EPOLLOUT | EPOLLIN;
        ev.data.u64 = c.idx;
        epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &ev);
        return true;
    }

    std::string request_for(const Conn &c) {
        std::string consumer = fmt_id(o_.consumer, c.idx % o_.consumers);
        std::string req;
        if (o_.system == "hold") {
            // Baseline: a plain nginx request that waits for a body byte that never comes.
            return "POST " + o_.path + " HTTP/1.1\r\nHost: " + o_.host +
                   "\r\nContent-Type: text/plain\r\nContent-Length: 1\r\n\r\n";
        }
        if (o_.system == "nchan") {
            std::string p = o_.sub_path;
            size_t at = p.find("%s");
            if (at != std::string::npos) p = p.substr(0, at) + consumer + p.substr(at + 2);
            req = "GET " + p + " HTTP/1.1\r\nHost: " + o_.host +
                  "\r\nAccept: text/event-stream\r\n";
        } else {
            req = "GET " + o_.path + " HTTP/1.1\r\nHost: " + o_.host +
                  "\r\nAccept: text/event-stream\r\nX-Consumer-Id: " + consumer + "\r\n";
        }
        if (!o_.last_event_id.empty()) req += "Last-Event-ID: " + o_.last_event_id + "\r\n";
        if (!o_.groups.empty()) req += "X-Consumer-Groups: " + o_.groups + "\r\n";
        req += "\r\n";
        return req;
    }

    void fail_conn(Conn &c, const std::string &why) {
        if (c.state < 2) {
            ++failed;
        } else {
            ++closed_early;
        }
        note_error(why);
        epoll_ctl(ep_, EPOLL_CTL_DEL, c.fd, nullptr);
        close(c.fd);
        c.fd = -1;
        c.state = 3;
        std::string().swap(c.hdr);
        std::string().swap(c.line);
    }

    void on_connected(Conn &c, uint32_t events) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0 || (events & (EPOLLERR | EPOLLHUP))) {
            return fail_conn(c, std::string("connect: ") + strerror(err ? err : ECONNRESET));
        }
        std::string req = request_for(c);
        ssize_t w = send(c.fd, req.data(), req.size(), MSG_NOSIGNAL);
        if (w != ssize_t(req.size())) {
            return fail_conn(c, "short write of the request");
        }
        c.state = 1;
        if (o_.system == "hold") {
            c.state = 2; // no answer is coming: counted as open once sent
            ++ok;
        }
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = c.idx;
        epoll_ctl(ep_, EPOLL_CTL_MOD, c.fd, &ev);
    }

    void on_readable(Conn &c, int64_t t, int64_t m) {
        static char buf[262144];
        // A few reads per wake-up (the replay stream is one socket with a lot to read).
        for (int round = 0; round < 4; ++round) {
            ssize_t n = recv(c.fd, buf, sizeof buf, 0);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) return;
                return fail_conn(c, std::string("recv: ") + strerror(errno));
            }
            if (n == 0) {
                return fail_conn(c, "server closed a stream");
            }
            st_.bytes += uint64_t(n);
            st_.reads++;
            if (o_.latency) {
                // Receipt time of this read (not of the epoll batch: a batch of 1,000 sockets
                // takes milliseconds to read).
                t = now_us();
                m = mono_us();
            }
            const char *p = buf;
            size_t len = size_t(n);
            if (c.state == 1) {
                size_t old = c.hdr.size();
                c.hdr.append(p, len);
                size_t he = c.hdr.find("\r\n\r\n");
                if (he == std::string::npos) {
                    if (c.hdr.size() > 16384) return fail_conn(c, "response head too large");
                    continue;
                }
                int status = c.hdr.size() > 12 ? atoi(c.hdr.c_str() + 9) : 0;
                if (status != 200) {
                    if (first_status_fail == 0) first_status_fail = status;
                    return fail_conn(c, "HTTP status " + std::to_string(status));
                }
                std::string lower(c.hdr, 0, he);
                for (char &ch : lower) ch = char(tolower(static_cast<unsigned char>(ch)));
                c.chunked = lower.find("transfer-encoding: chunked") != std::string::npos;
                size_t body_at = he + 4 - old;
                p += body_at;
                len -= body_at;
                std::string().swap(c.hdr);
                c.state = 2;
                ++ok;
            }
            if (len > 0) {
                if (c.chunked) {
                    dechunk(c, p, len, t, m);
                } else {
                    sse(c, p, len, t, m);
                }
            }
            if (size_t(n) < sizeof buf) return;
        }
    }

    void dechunk(Conn &c, const char *p, size_t len, int64_t t, int64_t m) {
        const char *end = p + len;
        while (p < end) {
            if (c.cstate == 1) {
                size_t take = size_t(std::min<uint64_t>(c.chunk_left, uint64_t(end - p)));
                sse(c, p, take, t, m);
                p += take;
                c.chunk_left -= take;
                if (c.chunk_left == 0) c.cstate = 2;
                continue;
            }
            char ch = *p++;
            if (c.cstate == 2) {
                if (ch == '\n') {
                    c.cstate = 0;
                    c.chunk_left = 0;
                    c.cext = false;
                }
                continue;
            }
            // cstate 0: hex size, optional extension, CRLF.
            if (ch == '\n') {
                if (c.chunk_left == 0) {
                    c.cstate = 2; // last chunk: the stream ended; trailers follow
                    continue;
                }
                c.cstate = 1;
                continue;
            }
            if (c.cext || ch == '\r') continue;
            if (ch == ';') {
                c.cext = true;
                continue;
            }
            int d = (ch >= '0' && ch <= '9') ? ch - '0'
                    : (ch >= 'a' && ch <= 'f') ? ch - 'a' + 10
                    : (ch >= 'A' && ch <= 'F') ? ch - 'A' + 10
                                               : -1;
            if (d >= 0 && c.chunk_left < (uint64_t(1) << 40)) c.chunk_left = c.chunk_left * 16 + uint64_t(d);
        }
    }

    void sse(Conn &c, const char *p, size_t len, int64_t t, int64_t m) {
        const char *end = p + len;
        while (p < end) {
            const char *nl = static_cast<const char *>(memchr(p, '\n', size_t(end - p)));
            if (nl == nullptr) {
                if (c.line.size() + size_t(end - p) > (1 << 20)) c.line.clear();
                c.line.append(p, size_t(end - p));
                return;
            }
            if (!c.line.empty()) {
                c.line.append(p, size_t(nl - p));
                sse_line(c, c.line.data(), c.line.size(), t, m);
                c.line.clear();
            } else {
                sse_line(c, p, size_t(nl - p), t, m);
            }
            p = nl + 1;
        }
    }

    void sse_line(Conn &c, const char *p, size_t n, int64_t t, int64_t m) {
        if (n > 0 && p[n - 1] == '\r') --n;
        if (n == 0) {
            dispatch(c.ev_data && !c.ev_heartbeat, c.ev_t, c.ev_id, t, m, c.ev_heartbeat);
            c.ev_data = false;
            c.ev_heartbeat = false;
            c.ev_t = -1;
            c.ev_id = -1;
            return;
        }
        if (n >= 5 && memcmp(p, "data:", 5) == 0) {
            c.ev_data = true;
            if (o_.latency && c.ev_t < 0) c.ev_t = parse_t(p + 5, n - 5);
        } else if (n >= 6 && memcmp(p, "event:", 6) == 0) {
            if (memmem(p, n, "heartbeat", 9) != nullptr) c.ev_heartbeat = true;
        } else if (n >= 3 && memcmp(p, "id:", 3) == 0) {
            const char *q = p + 3;
            while (q < p + n && *q == ' ') ++q;
            c.ev_id = strtoll(std::string(q, size_t(p + n - q)).c_str(), nullptr, 10);
        }
    }

    void dispatch(bool is_event, int64_t ev_t, int64_t id, int64_t t, int64_t m, bool hb) {
        if (hb) {
            st_.heartbeats++;
            return;
        }
        if (!is_event) return;
        st_.events++;
        if (st_.first_recv_mono == 0) st_.first_recv_mono = m;
        st_.last_recv_mono = m;
        if (id >= 0) st_.last_id = id;
        if (o_.latency && ev_t > 0) {
            int64_t l = t - ev_t;
            if (st_.lat.size() < st_.lat_cap) {
                st_.lat.push_back(int32_t(std::max<int64_t>(std::min<int64_t>(l, INT32_MAX), -1)));
            } else {
                st_.lat_dropped++;
            }
        }
        sh_.received.fetch_add(1, std::memory_order_relaxed);
    }

    void on_pg(int64_t t, int64_t m) {
        if (PQconsumeInput(pg_) != 1) {
            note_error(std::string("listen: ") + PQerrorMessage(pg_));
            return;
        }
        PGnotify *n;
        for (int guard = 0; guard < 1000000 && (n = PQnotifies(pg_)) != nullptr; ++guard) {
            int64_t et = o_.latency ? parse_t(n->extra, strlen(n->extra)) : -1;
            dispatch(true, et, -1, t, m, false);
            PQfreemem(n);
        }
    }

    const Options &o_;
    Shared &sh_;
    int ep_;
    std::vector<Conn> conns_;
    PGconn *pg_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Output

struct Json {
    std::string s = "{";
    bool first = true;
    void key(const char *k) {
        if (!first) s += ",";
        first = false;
        s += "\"";
        s += k;
        s += "\":";
    }
    void num(const char *k, double v) {
        key(k);
        char b[64];
        if (v == double(int64_t(v)) && std::abs(v) < 9e15) snprintf(b, sizeof b, "%" PRId64, int64_t(v));
        else snprintf(b, sizeof b, "%.6g", v);
        s += b;
    }
    void str(const char *k, const std::string &v) {
        key(k);
        s += "\"" + json_escape(v) + "\"";
    }
    void raw(const char *k, const std::string &v) {
        key(k);
        s += v;
    }
    void frag(const std::string &f) {
        if (f.empty()) return;
        if (!first) s += ",";
        first = false;
        s += f;
    }
    std::string done() { return s + "}"; }
};

std::string latency_json(std::vector<int32_t> &lat) {
    if (lat.empty()) return "null";
    std::sort(lat.begin(), lat.end());
    auto pct = [&](double q) {
        size_t i = size_t(q / 100.0 * double(lat.size() - 1) + 0.5);
        return lat[std::min(i, lat.size() - 1)];
    };
    double sum = 0;
    for (int32_t v : lat) sum += v;
    static const double qs[] = {1, 5, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.99};
    std::string out = "{\"n\":" + std::to_string(lat.size());
    char b[64];
    snprintf(b, sizeof b, ",\"mean\":%.1f", sum / double(lat.size()));
    out += b;
    out += ",\"min\":" + std::to_string(lat.front());
    out += ",\"max\":" + std::to_string(lat.back());
    out += ",\"pct\":{";
    for (size_t i = 0; i < sizeof qs / sizeof qs[0]; ++i) {
        snprintf(b, sizeof b, "%s\"%g\":%d", i ? "," : "", qs[i], pct(qs[i]));
        out += b;
    }
    out += "}}";
    return out;
}

} // namespace

int main(int argc, char **argv) {
    Options o = parse_args(argc, argv);
    // Enough descriptors for every stream (the harness raises the hard limit too).
    rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && o.conns + 64 > rl.rlim_cur) {
        die("need %" PRIu64 " descriptors, the limit is %llu", o.conns + 64,
            (unsigned long long)rl.rlim_cur);
    }

    Shared sh;
    Receiver rx(o, sh);
    Json j;
    j.frag(o.tags);
    j.str("mode", o.mode);
    j.str("system", o.mode == "listen" ? "pg_listen" : o.system);

    ProcSample base = sample_procs(o.pids);
    uint64_t base_pss = o.memory ? sample_pss(o.pids) : 0;
    int64_t t_open = mono_us();
    if (o.mode == "listen") {
        rx.open_listen();
    } else {
        rx.open_all();
    }
    int64_t open_ms = (mono_us() - t_open) / 1000;
    j.num("conns", double(o.conns));
    j.num("opened", double(rx.ok));
    j.num("failed", double(rx.failed));
    j.num("open_ms", double(open_ms));
    if (rx.failed > 0) {
        logf("%" PRIu64 " of %" PRIu64 " streams failed to open: %s", rx.failed, o.conns,
             rx.first_error.c_str());
    }

    // Idle period (memory test): keep reading so heartbeats do not pile up.
    if (o.hold_ms > 0) {
        int64_t until = mono_us() + o.hold_ms * 1000;
        while (mono_us() < until) rx.poll_once(20);
    }
    if (o.memory) {
        ProcSample after = sample_procs(o.pids, true);
        uint64_t pss = sample_pss(o.pids);
        j.num("rss_base", double(base.rss_bytes));
        j.num("rss_open", double(after.rss_bytes));
        j.num("pss_base", double(base_pss));
        j.num("pss_open", double(pss));
        double n = rx.ok ? double(rx.ok) : 1.0;
        j.num("rss_per_stream", (double(after.rss_bytes) - double(base.rss_bytes)) / n);
        j.num("pss_per_stream", (double(pss) - double(base_pss)) / n);
    }

    bool all_open = rx.ok == o.conns;
    bool publishing = o.publish != "none" && all_open;
    bool replay = o.expect_events > 0 && all_open;
    if (publishing || replay) {
        // Publishing: let the servers settle (headers flushed, listeners idle), then take the
        // baseline. Replay: the baseline is from before the stream was opened.
        ProcSample before = base;
        if (!replay) {
            for (int i = 0; i < 10; ++i) rx.poll_once(10);
            rx.st_.events = 0;
            rx.st_.lat.clear();
            rx.st_.first_recv_mono = 0;
            sh.received = 0;
            before = sample_procs(o.pids);
        }
        uint64_t rss_peak = before.rss_bytes;
        struct rusage ru0;
        getrusage(RUSAGE_SELF, &ru0);
        std::vector<std::thread> pubs;
        std::atomic<int> finished{0};
        int64_t t0 = replay ? t_open : mono_us();
        if (publishing) {
            for (int k = 0; k < o.pub_conns; ++k) {
                Pacer pacer{o, sh, k, o.pub_conns};
                pubs.emplace_back([&o, &sh, &finished, pacer]() {
                    if (o.publish == "pg") {
                        pg_publisher(o, sh, pacer);
                    } else {
                        http_publisher(o, sh, pacer);
                    }
                    if (finished.fetch_add(1) + 1 == o.pub_conns) sh.pub_done = true;
                });
            }
        }
        // Run until: publisher done and every expected delivery seen, or drain time over.
        int64_t hard = t0 + (o.duration_ms + o.drain_ms) * 1000 + 10000000;
        if (replay && o.run_ms > 0) hard = t0 + o.run_ms * 1000;
        int64_t next_rss = 0;
        int64_t pub_done_at = 0;
        for (uint64_t rounds = 0; rounds < 100000000; ++rounds) {
            rx.poll_once(2);
            int64_t m = mono_us();
            if (m >= next_rss && !o.pids.empty()) {
                ProcSample s = sample_procs(o.pids, true);
                rss_peak = std::max(rss_peak, s.rss_bytes);
                next_rss = m + 10000;
            }
            if (m > hard) break;
            if (replay) {
                if (rx.st_.events >= o.expect_events) break;
                continue;
            }
            if (sh.pub_done.load()) {
                if (pub_done_at == 0) pub_done_at = m;
                double expected = double(sh.acked.load()) * o.per_event;
                if (double(rx.st_.events) >= expected - 0.5) break;
                if (m - pub_done_at > o.drain_ms * 1000) break;
            }
        }
        sh.stop = true;
        for (std::thread &t : pubs) t.join();
        ProcSample after = sample_procs(o.pids);
        struct rusage ru1;
        getrusage(RUSAGE_SELF, &ru1);
        double client_cpu = double(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                            double(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                            double(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                            double(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
        uint64_t acked = sh.acked.load();
        double expected = double(acked) * o.per_event;
        int64_t start = replay ? t0 : sh.first_pub_mono.load();
        int64_t endm = rx.st_.last_recv_mono ? rx.st_.last_recv_mono : mono_us();
        double secs = start > 0 && endm > start ? double(endm - start) / 1e6 : 0;
        double cpu_ns = double(after.sched_ns - before.sched_ns);
        double cpu_stat_ns = double(after.stat_ticks - before.stat_ticks) * 1e9 /
                             double(sysconf(_SC_CLK_TCK));
        uint64_t d = rx.st_.events;
        j.num("published", double(sh.published.load()));
        j.num("acked", double(acked));
        j.num("pub_errors", double(sh.pub_errors.load()));
        if (!sh.pub_error_text.empty()) j.str("pub_error", sh.pub_error_text);
        j.num("expected", expected);
        j.num("deliveries", double(d));
        j.num("complete", replay ? (d >= o.expect_events ? 1 : 0) : (double(d) >= expected - 0.5 ? 1 : 0));
        j.num("secs", secs);
        j.num("deliveries_per_s", secs > 0 ? double(d) / secs : 0);
        double pub_secs = double(sh.last_pub_mono.load() - sh.first_pub_mono.load()) / 1e6;
        j.num("publish_per_s", pub_secs > 0 ? double(acked) / pub_secs : 0);
        j.num("server_cpu_s", cpu_ns / 1e9);
        j.num("server_cpu_stat_s", cpu_stat_ns / 1e9);
        j.num("cpu_us_per_delivery", d ? cpu_ns / 1e3 / double(d) : 0);
        j.num("cpu_us_per_event", acked ? cpu_ns / 1e3 / double(acked) : 0);
        j.num("cpu_stat_us_per_delivery", d ? cpu_stat_ns / 1e3 / double(d) : 0);
        j.num("client_cpu_s", client_cpu);
        j.num("rss_before", double(before.rss_bytes));
        j.num("rss_peak", double(rss_peak));
        j.num("rss_growth", double(rss_peak) - double(before.rss_bytes));
        j.num("last_id", double(rx.st_.last_id));
        j.num("heartbeats", double(rx.st_.heartbeats));
        j.num("bytes", double(rx.st_.bytes));
        j.num("reads", double(rx.st_.reads));
        j.raw("latency_us", o.latency ? latency_json(rx.st_.lat) : std::string("null"));
    }
    j.num("closed_early", double(rx.closed_early));
    if (!rx.first_error.empty()) j.str("error", rx.first_error);
    rx.close_all();
    printf("%s\n", j.done().c_str());
    fflush(stdout);
    return 0;
}
