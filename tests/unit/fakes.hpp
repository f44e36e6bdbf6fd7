// Test doubles for the core's ports: a database link that records what it was asked to do, a
// timer that tests fire by hand, a log and a clock.
#pragma once

#include "ports.hpp"
#include "stream.hpp"

#include <optional>
#include <string>
#include <vector>

namespace event_piper::testing {

class FakeLink : public DbLink {
public:
    State state() const override { return state_; }
    void connect() override {
        ++connects;
        state_ = State::Connecting;
    }
    bool send(const char *sql, int n, const char *const *params) override {
        if (state_ != State::Ready) {
            return false;
        }
        sent.emplace_back(sql);
        last_params.assign(params, params + n);
        state_ = State::Busy;
        return true;
    }
    void close() override { state_ = State::Down; }

    // What the network would do: the test plays the link's side.
    void connected(DbLinkOwner &owner) {
        state_ = State::Ready;
        owner.on_link_ready(*this);
    }
    void idle(DbLinkOwner &owner) {
        state_ = State::Ready;
        owner.on_link_idle(*this);
    }
    void lost(DbLinkOwner &owner, std::string_view why = "connection reset") {
        state_ = State::Down;
        owner.on_link_lost(*this, why);
    }

    int connects = 0;
    std::vector<std::string> sent;
    std::vector<std::string> last_params;

private:
    State state_ = State::Down;
};

class FakeTimer : public Timer {
public:
    void arm(uint64_t ms) override {
        armed_ms = ms;
        history.push_back(ms);
    }
    void cancel() override { armed_ms.reset(); }
    bool armed() const override { return armed_ms.has_value(); }
    // Fires it (the caller then calls the owner's handler).
    uint64_t fire() {
        uint64_t ms = armed_ms.value();
        armed_ms.reset();
        return ms;
    }
    std::optional<uint64_t> armed_ms;
    std::vector<uint64_t> history;
};

class FakeLog : public Log {
public:
    void write(LogLevel level, std::string_view message) override {
        lines.push_back({level, std::string(message)});
    }
    size_t count(std::string_view needle) const {
        size_t n = 0;
        for (const auto &l : lines) {
            n += l.second.find(needle) != std::string::npos ? 1 : 0;
        }
        return n;
    }
    std::vector<std::pair<LogLevel, std::string>> lines;
};

class FakeClock : public Clock {
public:
    uint64_t now_ms() const override { return now; }
    uint64_t now = 1700000000000;
};

// A result as rows of optional text (nullopt: NULL), or an error.
class FakeResult : public QueryResult {
public:
    using Row = std::vector<std::optional<std::string>>;
    explicit FakeResult(std::vector<Row> rows) : rows_(std::move(rows)) {}
    static FakeResult command_ok() { return FakeResult(std::vector<Row>{}); }
    static FakeResult failure(std::string message) {
        FakeResult r({});
        r.error_ = std::move(message);
        return r;
    }
    bool ok() const override { return error_.empty(); }
    std::string error() const override { return error_; }
    int rows() const override { return static_cast<int>(rows_.size()); }
    int columns() const override { return rows_.empty() ? 0 : static_cast<int>(rows_[0].size()); }
    bool is_null(int row, int column) const override { return !rows_[row][column].has_value(); }
    std::string_view value(int row, int column) const override {
        const auto &v = rows_[row][column];
        return v ? std::string_view(*v) : std::string_view();
    }

private:
    std::vector<Row> rows_;
    std::string error_;
};

// Counts wakes and ends of a stream.
class FakeOwner : public StreamOwner {
public:
    void wake() override { ++wakes; }
    void end() override { ++ends; }
    int wakes = 0;
    int ends = 0;
};

} // namespace event_piper::testing
