// Consumer id -> the streams of this worker that consume it. A stream with several ids is in
// the group of each (S::consumers(), its first id being its primary one): an event has one
// subscriber, so it reaches such a stream once; `for_each_all` and `streams()` count it once.
// Fan-out is safe against the callback removing (or adding) streams: removal during iteration
// leaves a hole that is compacted when the outermost iteration ends.
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace event_piper {

template <typename S> class Registry {
public:
    // All or nothing: if an allocation fails (std::bad_alloc), the registry is as it was.
    void add(std::string_view consumer, S *stream) {
        auto it = groups_.find(consumer);
        if (it == groups_.end()) {
            auto group = std::make_unique<Group>();
            group->name.assign(consumer.data(), consumer.size());
            group->members.push_back(stream);   // before the group is in the map
            std::string_view key = group->name; // stable: the group lives on the heap
            groups_.emplace(key, std::move(group));
        } else {
            it->second->members.push_back(stream);
        }
        if (primary(consumer, stream)) {
            ++streams_;
        }
    }

    void remove(std::string_view consumer, S *stream) {
        auto it = groups_.find(consumer);
        if (it == groups_.end()) {
            return;
        }
        Group &group = *it->second;
        auto pos = std::find(group.members.begin(), group.members.end(), stream);
        if (pos == group.members.end()) {
            return;
        }
        if (primary(consumer, stream)) {
            --streams_;
        }
        if (group.iterating > 0 || iterating_all_ > 0) {
            *pos = nullptr;
            group.holes = true;
            return;
        }
        group.members.erase(pos);
        if (group.members.empty()) {
            groups_.erase(it);
        }
    }

    // Calls f(S&) for each stream of `consumer`; returns false if the consumer has none.
    template <typename F> bool for_each(std::string_view consumer, F &&f) {
        auto it = groups_.find(consumer);
        if (it == groups_.end()) {
            return false;
        }
        Group *group = it->second.get();
        {
            Guard guard(group->iterating);    // also undone if f throws
            size_t n = group->members.size(); // streams added meanwhile wait for the next event
            for (size_t i = 0; i < n; ++i) {
                if (S *s = group->members[i]) {
                    f(*s);
                }
            }
        }
        if (group->iterating == 0 && iterating_all_ == 0 &&
            (group->holes || group->members.empty())) {
            compact(group); // only after a removal: the common fan-out costs one lookup
        }
        return true;
    }

    // Calls f(S&) once for every stream (in the group of its primary id).
    template <typename F> void for_each_all(F &&f) {
        {
            Guard guard(iterating_all_); // also undone if f (or the vector) throws
            std::vector<Group *> groups;
            groups.reserve(groups_.size());
            for (auto &entry : groups_) {
                groups.push_back(entry.second.get());
            }
            for (Group *group : groups) {
                size_t n = group->members.size();
                for (size_t i = 0; i < n; ++i) {
                    S *s = group->members[i];
                    if (s != nullptr && primary(group->name, s)) {
                        f(*s);
                    }
                }
            }
        }
        if (iterating_all_ == 0) {
            for (auto it = groups_.begin(); it != groups_.end();) {
                Group &g = *it->second;
                if (g.iterating == 0 && g.holes) {
                    g.members.erase(std::remove(g.members.begin(), g.members.end(), nullptr),
                                    g.members.end());
                    g.holes = false;
                }
                if (g.iterating == 0 && g.members.empty()) {
                    it = groups_.erase(it);
                } else {
                    ++it;
                }
            }
        }
    }

    size_t consumers() const { return groups_.size(); } // distinct ids
    size_t streams() const { return streams_; }         // distinct streams

private:
    static bool primary(std::string_view consumer, const S *stream) {
        return stream->consumers().front() == consumer;
    }

    // Marks an iteration in progress for its scope: removals leave holes meanwhile.
    class Guard {
    public:
        explicit Guard(int &depth) : depth_(depth) { ++depth_; }
        ~Guard() { --depth_; }
        Guard(const Guard &) = delete;
        Guard &operator=(const Guard &) = delete;

    private:
        int &depth_;
    };

    struct Group {
        std::string name;
        std::vector<S *> members;
        int iterating = 0;
        bool holes = false;
    };

    void compact(Group *group) {
        auto it = groups_.find(std::string_view(group->name));
        if (it == groups_.end()) {
            return;
        }
        Group &g = *it->second;
        if (g.holes) {
            g.members.erase(std::remove(g.members.begin(), g.members.end(), nullptr),
                            g.members.end());
            g.holes = false;
        }
        if (g.members.empty()) {
            groups_.erase(it);
        }
    }

    std::unordered_map<std::string_view, std::unique_ptr<Group>> groups_;
    size_t streams_ = 0;
    int iterating_all_ = 0;
};

} // namespace event_piper
