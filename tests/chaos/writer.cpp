// A chaos writer for tests/integration/test_chaos.py: one libpq connection that inserts events in
// transactions of random length (with pauses inside, so that concurrent writers commit out of id
// order), rolls some back on purpose, makes some payloads larger than NOTIFY's 8000 bytes, and
// survives PostgreSQL restarts: a transaction cut before COMMIT is retried; one whose COMMIT got no
// answer is looked up by its unique marker (payload->>'tx') and retried only if it is not there.
//
// usage: writer <conninfo> <writer id> <seed> <subscribers, comma separated> [big percent]
//                [rollback percent] [max pause ms]
// Runs until SIGTERM or SIGINT (the transaction in progress is finished first), then exits 0.
// Output, one line per transaction outcome (stdout, flushed):
//   C <marker> <rows>     committed
//   R <marker> <rows>     rolled back on purpose
//   A <marker> <rows>     aborted by a failure before COMMIT (not committed; retried)
//   U <marker> <rows> C|A the COMMIT's answer was lost; the table says committed / not
//   E <text>              an unexpected error (the test fails on these)
//   S committed=<n> rows=<n> rolled_back=<n> aborted=<n> unknown=<n> reconnects=<n>
#include <libpq-fe.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

std::atomic<bool> stop_requested{false};

void on_signal(int) { stop_requested = true; }

void sleep_ms(int ms) {
    if (ms > 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    }
}

struct Row {
    std::string type, subscriber, payload;
};

class Writer {
public:
    Writer(std::string conninfo, int id, unsigned seed, std::vector<std::string> subs, int big_pct,
           int rollback_pct, int max_pause)
        : conninfo_(std::move(conninfo)), id_(id), rng_(seed), subs_(std::move(subs)),
          big_pct_(big_pct), rollback_pct_(rollback_pct), max_pause_(max_pause) {}

    ~Writer() {
        if (conn_ != nullptr) {
            PQfinish(conn_);
        }
    }

    int run() {
        connect();
        while (!stop_requested) {
            one_transaction();
            sleep_ms(rand_int(0, max_pause_ / 2));
        }
        std::printf("S committed=%d rows=%d rolled_back=%d aborted=%d unknown=%d reconnects=%d\n",
                    committed_, rows_, rolled_back_, aborted_, unknown_, reconnects_);
        std::fflush(stdout);
        return 0;
    }

private:
    int rand_int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }

    bool connected() const { return conn_ != nullptr && PQstatus(conn_) == CONNECTION_OK; }

    // Connects, retrying every 100 ms (PostgreSQL may be restarting). Gives up only on stop.
    bool connect() {
        for (int attempt = 0;; ++attempt) {
            if (conn_ != nullptr) {
                PQfinish(conn_);
                conn_ = nullptr;
            }
            conn_ = PQconnectdb(conninfo_.c_str());
            if (PQstatus(conn_) == CONNECTION_OK) {
                if (attempt > 0 || ever_connected_) {
                    ++reconnects_;
                }
                ever_connected_ = true;
                return true;
            }
            if (stop_requested && attempt > 600) {
                return false;
            }
            sleep_ms(100);
        }
    }

    // Runs a command; true when it succeeded. *lost: the connection broke.
    bool exec(const char *sql, bool *lost, std::string *status = nullptr) {
        PGresult *r = PQexec(conn_, sql);
        bool ok = r != nullptr && PQresultStatus(r) == PGRES_COMMAND_OK;
        if (status != nullptr && r != nullptr) {
            *status = PQcmdStatus(r);
        }
        if (!ok) {
            *lost = !connected();
            if (!*lost) {
                error(sql, r);
            }
        }
        PQclear(r);
        return ok;
    }

    bool insert(const Row &row, bool *lost) {
        const char *values[3] = {row.type.c_str(), row.subscriber.c_str(), row.payload.c_str()};
        PGresult *r = PQexecParams(conn_,
                                   "insert into events (type, timestamp, subscriber, payload) "
                                   "values ($1, now(), $2, $3::jsonb)",
                                   3, nullptr, values, nullptr, nullptr, 0);
        bool ok = r != nullptr && PQresultStatus(r) == PGRES_COMMAND_OK;
        if (!ok) {
            *lost = !connected();
            if (!*lost) {
                error("insert", r);
            }
        }
        PQclear(r);
        return ok;
    }

    void error(const char *what, PGresult *r) {
        std::string msg = r != nullptr ? PQresultErrorMessage(r) : PQerrorMessage(conn_);
        for (char &c : msg) {
            if (c == '\n') {
                c = ' ';
            }
        }
        std::printf("E writer %d: %s: %s\n", id_, what, msg.c_str());
        std::fflush(stdout);
    }

    // -1: cannot tell (connection broke again), else the number of rows carrying the marker.
    long rows_with_marker(const std::string &marker) {
        const char *values[1] = {marker.c_str()};
        PGresult *r = PQexecParams(conn_, "select count(*) from events where payload->>'tx' = $1",
                                   1, nullptr, values, nullptr, nullptr, 0);
        long n = -1;
        if (r != nullptr && PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1) {
            n = std::strtol(PQgetvalue(r, 0, 0), nullptr, 10);
        }
        PQclear(r);
        return n;
    }

    std::string pad(size_t n) {
        static const char alphabet[] = "abcdefghijklmnopqrstuvwxyz0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ";
        std::string s;
        s.reserve(n + 8);
        while (s.size() < n) {
            int k = rand_int(0, 99);
            if (k == 0) {
                s += "\\n\\nid: 999"; // escaped in JSON: one data line on the wire
            } else if (k == 1) {
                s += "\xc3\xa9"; // é
            } else if (k == 2) {
                s += "\\\"";
            } else {
                s += alphabet[rand_int(0, sizeof alphabet - 2)];
            }
        }
        return s;
    }

    std::vector<Row> make_rows(const std::string &marker) {
        std::vector<Row> rows;
        int n = rand_int(1, 4);
        static const char *types[] = {"insert", "update", "delete", "user created", "caf\xc3\xa9"};
        for (int k = 0; k < n; ++k) {
            Row row;
            bool big = rand_int(1, 100) <= big_pct_;
            row.type = big ? "big" : types[rand_int(0, 4)];
            row.subscriber = subs_[rand_int(0, static_cast<int>(subs_.size()) - 1)];
            size_t len = big ? static_cast<size_t>(rand_int(8000, 20000))
                             : static_cast<size_t>(rand_int(0, 200));
            row.payload = "{\"tx\": \"" + marker + "\", \"k\": " + std::to_string(k) +
                          ", \"w\": " + std::to_string(id_) + ", \"pad\": \"" + pad(len) +
                          "\", \"nested\": {\"a\": [1, 2, {\"b\": null}], \"t\": true}}";
            rows.push_back(std::move(row));
        }
        return rows;
    }

    void one_transaction() {
        int attempt = 0;
        std::string base = "w" + std::to_string(id_) + "-" + std::to_string(++seq_);
        bool rollback = rand_int(1, 100) <= rollback_pct_;
        for (;;) {
            std::string marker = attempt == 0 ? base : base + "-r" + std::to_string(attempt);
            std::vector<Row> rows = make_rows(marker);
            if (!connected() && !connect()) {
                return;
            }
            bool lost = false;
            bool ok = exec("begin", &lost);
            for (size_t i = 0; ok && i < rows.size(); ++i) {
                sleep_ms(rand_int(0, max_pause_));
                ok = insert(rows[i], &lost);
            }
            if (ok) {
                sleep_ms(rand_int(0, max_pause_));
            }
            if (ok && rollback) {
                ok = exec("rollback", &lost);
                if (ok || lost) {
                    // Rolled back, or cut before COMMIT: not committed either way.
                    std::printf("R %s %zu\n", marker.c_str(), rows.size());
                    std::fflush(stdout);
                    ++rolled_back_;
                    return;
                }
            }
            std::string status;
            if (ok) {
                ok = exec("commit", &lost, &status);
                if (ok && status == "COMMIT") {
                    std::printf("C %s %zu\n", marker.c_str(), rows.size());
                    std::fflush(stdout);
                    ++committed_;
                    rows_ += static_cast<int>(rows.size());
                    return;
                }
                if (ok) { // "ROLLBACK": the transaction had failed
                    std::printf("E writer %d: commit of %s answered %s\n", id_, marker.c_str(),
                                status.c_str());
                    std::fflush(stdout);
                    return;
                }
                if (lost) {
                    // The answer to COMMIT is lost: ask the table.
                    ++unknown_;
                    long n = -1;
                    while (n < 0) {
                        if (!connect()) {
                            return;
                        }
                        n = rows_with_marker(marker);
                    }
                    bool was_committed = n > 0;
                    std::printf("U %s %zu %s\n", marker.c_str(), rows.size(), was_committed ? "C" : "A");
                    std::fflush(stdout);
                    if (n != 0 && n != static_cast<long>(rows.size())) {
                        std::printf("E writer %d: %s has %ld rows of %zu\n", id_, marker.c_str(), n,
                                    rows.size());
                    }
                    if (was_committed) {
                        ++committed_;
                        rows_ += static_cast<int>(rows.size());
                        return;
                    }
                    ++attempt;
                    continue;
                }
                return; // an error with the connection intact: reported by exec
            }
            if (!lost) {
                bool ignored = false;
                exec("rollback", &ignored);
                return; // reported
            }
            // Cut before COMMIT: PostgreSQL rolled it back. Retry as a new transaction.
            std::printf("A %s %zu\n", marker.c_str(), rows.size());
            std::fflush(stdout);
            ++aborted_;
            ++attempt;
        }
    }

    std::string conninfo_;
    int id_;
    std::mt19937 rng_;
    std::vector<std::string> subs_;
    int big_pct_, rollback_pct_, max_pause_;
    PGconn *conn_ = nullptr;
    bool ever_connected_ = false;
    int seq_ = 0;
    int committed_ = 0, rows_ = 0, rolled_back_ = 0, aborted_ = 0, unknown_ = 0, reconnects_ = 0;
};

} // namespace

int main(int argc, char **argv) {
    if (argc < 5) {
        std::fprintf(stderr,
                     "usage: %s <conninfo> <writer id> <seed> <subscribers,...> [big%%] "
                     "[rollback%%] [max pause ms]\n",
                     argv[0]);
        return 2;
    }
    std::signal(SIGTERM, on_signal);
    std::signal(SIGINT, on_signal);
    std::signal(SIGPIPE, SIG_IGN);
    std::vector<std::string> subs;
    std::string list = argv[4];
    size_t start = 0;
    for (;;) {
        size_t comma = list.find(',', start);
        subs.push_back(list.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
        if (comma == std::string::npos) {
            break;
        }
        start = comma + 1;
    }
    int big = argc > 5 ? std::atoi(argv[5]) : 6;
    int rollback = argc > 6 ? std::atoi(argv[6]) : 12;
    int pause = argc > 7 ? std::atoi(argv[7]) : 30;
    Writer w(argv[1], std::atoi(argv[2]), static_cast<unsigned>(std::strtoul(argv[3], nullptr, 10)),
             subs, big, rollback, pause);
    return w.run();
}
