// The seam between the core and nginx: the small interfaces through which the core's state
// machines act on the world (a database link to send a query on, a timer to arm, a log to write)
// and hear from it (results, notifications, a lost link). src/ngx/ implements them with libpq in
// nginx's event loop; the unit tests implement them with fakes.
#pragma once

#include <charconv>
#include <cstdint>
#include <string>
#include <string_view>

namespace event_piper {

enum class LogLevel { Error, Warn, Notice, Info };

class Log {
public:
    virtual void write(LogLevel level, std::string_view message) = 0;

protected:
    ~Log() = default;
};

// A one-shot timer. Arming an armed timer moves it.
class Timer {
public:
    virtual void arm(uint64_t ms) = 0;
    virtual void cancel() = 0;
    virtual bool armed() const = 0;

protected:
    ~Timer() = default;
};

// One result of a query, read-only, valid during the callback that hands it over.
class QueryResult {
public:
    virtual bool ok() const = 0; // the command or query succeeded
    virtual std::string error() const = 0;
    virtual int rows() const = 0;
    virtual int columns() const = 0;
    virtual bool is_null(int row, int column) const = 0;
    virtual std::string_view value(int row, int column) const = 0;

    // 0 if NULL or not a number.
    int64_t number(int row, int column) const {
        std::string_view text = value(row, column);
        int64_t v = 0;
        std::from_chars(text.data(), text.data() + text.size(), v);
        return v;
    }

protected:
    ~QueryResult() = default;
};

// A non-blocking database connection. Its owner hears what happens through DbLinkOwner.
class DbLink {
public:
    enum class State { Down, Connecting, Ready, Busy };

    virtual State state() const = 0;
    // Starts connecting; the owner hears on_link_ready or on_link_lost.
    virtual void connect() = 0;
    // Sends a query with text parameters (Ready only). False if it failed at once: the link is
    // then Down and the owner has heard on_link_lost.
    virtual bool send(const char *sql, int n_params, const char *const *params) = 0;
    // Closes without telling the owner.
    virtual void close() = 0;

protected:
    ~DbLink() = default;
};

class DbLinkOwner {
public:
    virtual void on_link_ready(DbLink &link) = 0;                             // connected, idle
    virtual void on_link_result(DbLink &link, const QueryResult &result) = 0; // one result
    virtual void on_link_idle(DbLink &link) = 0;                              // query complete
    virtual void on_link_lost(DbLink &link, std::string_view why) = 0;        // Down again
    virtual void on_link_notify(DbLink &, std::string_view /*payload*/) {}
    // The notifications read from the socket in one go have all been handed over.
    virtual void on_link_notifies_done(DbLink &) {}

protected:
    ~DbLinkOwner() = default;
};

class Clock {
public:
    virtual uint64_t now_ms() const = 0; // wall clock, milliseconds since the epoch

protected:
    ~Clock() = default;
};

// Reconnect delays: 100 ms, doubling up to 5 s; reset by a success.
class Backoff {
public:
    static constexpr uint64_t first_ms = 100;
    static constexpr uint64_t max_ms = 5000;

    uint64_t next() {
        delay_ = delay_ == 0 ? first_ms : (delay_ * 2 > max_ms ? max_ms : delay_ * 2);
        return delay_;
    }
    void reset() { delay_ = 0; }
    uint64_t current() const { return delay_; }

private:
    uint64_t delay_ = 0;
};

} // namespace event_piper
