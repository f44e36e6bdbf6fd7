// The shared-memory status zone: one slot per worker process, written by its worker once a
// second and read by the status and health handlers of any worker. Survives reloads, so old and
// new workers publish side by side; a slot whose process is gone is free.
#pragma once

extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
}

#include "core/relay.hpp"
#include "core/status.hpp"

#include <atomic>
#include <vector>

namespace event_piper {

// What a worker shows the holder of the instance's listener (event_piper_listener shared).
// Atomics in zeroed shared memory: lock-free, so plain words across processes.
struct RelaySlot {
    std::atomic<uint64_t> bound;            // 1: its socket is open, named by the slot's index
    std::atomic<uint64_t> seq;              // last sequence number the holder took for it
    std::atomic<uint64_t> overruns;         // sends to it that failed (buffer full)
    std::atomic<uint64_t> waiting_since_ms; // its hub's oldest stream waiting for a position
    std::atomic<uint64_t> beat_ms;          // its heartbeat (CLOCK_MONOTONIC), every 500 ms
    std::atomic<uint64_t> interest[interest_bits / 64];
};

struct StatusSlot {
    ngx_atomic_t owner;      // the pid that holds the slot (0: free)
    SharedWorkerStats stats; // its figures, published once a second
    RelaySlot relay;
};

constexpr size_t status_slots = 128;

struct StatusZone {
    StatusSlot slots[status_slots];
    RelayBoard board;
};

bool process_alive(ngx_atomic_uint_t pid);

// Adds the zone to the configuration (postconfiguration).
ngx_shm_zone_t *add_status_zone(ngx_conf_t *cf);

// Claims a free slot for this process (nullptr: none free, logged).
StatusSlot *claim_status_slot(ngx_shm_zone_t *zone, ngx_log_t *log);
void release_status_slot(StatusSlot *slot);

// The figures of every live worker.
std::vector<WorkerStats> read_status_zone(ngx_shm_zone_t *zone);

} // namespace event_piper
