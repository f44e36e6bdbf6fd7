// Per-worker state (nginx adapter): the listening connection, the replay pool, the consumer
// registry and the open sessions. Built in init_process, destroyed in exit_process; nothing of it
// exists in the master.
#pragma once

extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_http.h>
}

#include "ngx_pg_link.hpp"
#include "registry.hpp"
#include "status.hpp"
#include "stream.hpp"

#include <deque>
#include <memory>
#include <string>
#include <vector>

extern "C" ngx_module_t ngx_event_piper_module;

namespace event_piper {

struct MainConf {
    ngx_shm_zone_t *status_zone; // one StatusSlot per worker, for event_piper_status
    ngx_str_t conninfo;
    ngx_str_t channel;
    ngx_uint_t replay_connections;
    ngx_flag_t used; // some location has `event_piper;`
};

// A worker's slot in the status zone. `owner` is the pid that holds it (0: free).
struct StatusSlot {
    ngx_atomic_t owner;
    WorkerStats stats;
};
constexpr size_t status_slots = 128;
struct StatusZone {
    StatusSlot slots[status_slots];
};

struct LocConf {
    ngx_http_complex_value_t *consumer;
    ngx_http_complex_value_t *last_event_id;
    ngx_msec_t heartbeat; // 0: off
    ngx_msec_t retry;     // 0: unset
    ngx_uint_t replay_batch;
    size_t stream_buffer;
};

class Worker;

// One SSE response: the nginx request, its delivery state, its output and its heartbeat timer.
// Lives in the request pool; the request's cleanup detaches it from the worker.
class Session {
public:
    Session(Worker &worker, ngx_http_request_t *r, const LocConf &conf, std::string consumer,
            int64_t last_position);
    ~Session() { detach(); }

    Stream core;

    // Registers with the worker, sends the retry hint if configured, starts heartbeats.
    void start();
    // Schedules flush() in request context (posts the connection's write event).
    void wake();
    // Hands pending bytes to nginx when it can take them; asks for the next batch when drained.
    void flush();
    // Ends the response: optional final bytes, last chunk, finalize. `graceful`: add a retry hint.
    void finish(bool graceful);
    // Forgets the worker (registry, replay queue, timers). Idempotent.
    void detach();

    ngx_http_request_t *request() const { return r_; }
    size_t replay_batch() const { return batch_; }
    // Byte budget of one replay batch: the stream buffer (at least one row is always sent).
    size_t replay_bytes() const { return buffer_limit_; }

    bool queued = false;        // waiting in the replay pool's queue
    bool end_requested = false; // end the stream (with a retry hint) at the next flush
    PgLink *serving = nullptr;  // replay link running this session's query

    static void write_handler(ngx_http_request_t *r) noexcept;
    static void heartbeat_handler(ngx_event_t *ev) noexcept;
    static void cleanup_handler(void *data) noexcept;

private:
    bool nginx_holds_output() const;
    bool push(ngx_chain_t *in);
    void wait_for_socket();
    void arm_heartbeat();

    Worker *worker_;
    ngx_http_request_t *r_;
    ngx_event_t heartbeat_ev_;
    ngx_msec_t heartbeat_;
    ngx_msec_t retry_;
    ngx_msec_t last_write_;
    size_t batch_;
    size_t buffer_limit_;
    std::string inflight_; // bytes handed to nginx, alive until it has sent them
    ngx_chain_t *free_ = nullptr;
    ngx_chain_t *busy_ = nullptr;
    bool detached_ = false;
    bool started_ = false;
    bool finished_ = false;
};

// The pool of replay connections: a FIFO of sessions waiting for their next batch, served by at
// most `size` connections, each returned to the pool after every batch.
class ReplayPool : public PgLinkOwner {
public:
    ReplayPool(Worker &worker, ngx_log_t *log, const std::string &conninfo, size_t size);
    ~ReplayPool();

    void request(Session &s);
    void cancel(Session &s);
    void close_all();

    uint64_t queries() const { return queries_; }
    size_t queued_count() const { return queue_.size(); }

    void on_link_ready(PgLink &link) override;
    void on_link_result(PgLink &link, PGresult *res) override;
    void on_link_idle(PgLink &link) override;
    void on_link_lost(PgLink &link, const char *why) override;

private:
    struct Job {
        Session *session = nullptr;
        size_t rows = 0;
        size_t fetched = 0; // rows the batch query found before the byte cap
        int64_t newest = 0; // newest committed position when the query ran
        bool failed = false;
    };
    void dispatch();
    static void retry_handler(ngx_event_t *ev) noexcept;

    Worker &worker_;
    ngx_log_t *log_;
    std::vector<std::unique_ptr<PgLink>> links_;
    std::vector<Job> jobs_; // parallel to links_
    std::deque<Session *> queue_;
    ngx_event_t retry_ev_;
    ngx_msec_t backoff_ = 0;
    uint64_t queries_ = 0;
    bool reported_down_ = false;
};

// The LISTEN connection: connect, LISTEN, read the newest position, then hand notifications to
// the worker. Reconnects with backoff; each successful LISTEN session has a new epoch.
class Listener : public PgLinkOwner {
public:
    Listener(Worker &worker, ngx_log_t *log, const std::string &conninfo,
             const std::string &channel);
    ~Listener();

    void start();
    void close();
    uint64_t epoch() const { return epoch_; } // 0 while not listening
    uint64_t reconnects() const { return reconnects_; }

    void on_link_ready(PgLink &link) override;
    void on_link_result(PgLink &link, PGresult *res) override;
    void on_link_idle(PgLink &link) override;
    void on_link_lost(PgLink &link, const char *why) override;
    void on_link_notify(PgLink &link, PGnotify *n) override;

private:
    enum class Phase { Connecting, Listening, ReadingHead, Live };
    static void retry_handler(ngx_event_t *ev) noexcept;

    Worker &worker_;
    ngx_log_t *log_;
    PgLink link_;
    std::string listen_sql_;
    ngx_event_t retry_ev_;
    ngx_msec_t backoff_ = 0;
    Phase phase_ = Phase::Connecting;
    uint64_t epoch_ = 0;
    uint64_t sessions_ = 0;
    uint64_t reconnects_ = 0;
    int64_t head_seen_ = 0;
    int64_t before_seen_ = 0;
    bool ever_connected_ = false;
    bool reported_down_ = false;
    bool closing_ = false;
};

class Worker {
public:
    Worker(ngx_cycle_t *cycle, const MainConf &conf);
    ~Worker();

    void start();
    // Graceful stop (nginx quit/reload): end every stream with a retry hint, close connections.
    void shutdown();
    bool shutting_down() const { return shutting_down_; }

    void add(Session &s);
    void remove(Session &s);
    void request_batch(Session &s) { pool_.request(s); }

    // The position a stream without Last-Event-ID starts from (-1: not known yet).
    int64_t head() const { return head_; }
    uint64_t listener_epoch() const { return listener_.epoch(); }
    bool listening() const { return listener_.epoch() != 0; }

    // From the listener.
    void on_notification(const char *payload);
    // `before_unpositioned`: where streams opened without a resume point start (see
    // note_unpositioned_stream).
    void on_listener_ready(int64_t head, int64_t before_unpositioned);
    // A stream opened with no resume point while the worker knows no position: remember when,
    // so that the listener can find the newest position committed before (0: none waiting).
    void note_unpositioned_stream();
    uint64_t unpositioned_since_ms() const { return unpositioned_since_ms_; }
    void on_listener_lost();
    void note_position(int64_t pos) {
        if (pos > head_) {
            head_ = pos;
        }
    }

    WorkerStats &stats() { return stats_; }

private:
    static void quit_handler(ngx_event_t *ev) noexcept;
    static void publish_handler(ngx_event_t *ev) noexcept;
    void publish();
    void claim_status_slot(ngx_shm_zone_t *zone);

    ngx_log_t *log_;
    Registry<Session> registry_;
    Listener listener_;
    ReplayPool pool_;
    std::string frame_; // one serialisation per event, shared by all its streams
    ngx_connection_t *quit_sentinel_ = nullptr;
    StatusSlot *slot_ = nullptr;
    ngx_event_t publish_ev_;
    WorkerStats stats_;
    int64_t head_ = -1;
    uint64_t unpositioned_since_ms_ = 0;
    bool shutting_down_ = false;
    bool warned_foreign_ = false;
};

// The worker of this process, or nullptr (master, helpers, or module unused).
Worker *current_worker();
void create_worker(ngx_cycle_t *cycle, const MainConf &conf);
void destroy_worker();

} // namespace event_piper
