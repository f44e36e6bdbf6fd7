// The shared-memory status zone: one slot per worker process, written by its worker once a
// second and read by the status and health handlers of any worker. Survives reloads, so old and
// new workers publish side by side; a slot whose process is gone is free.
#pragma once

extern "C" {
#include <ngx_config.h>
#include <ngx_core.h>
}

#include "core/status.hpp"

#include <vector>

namespace event_piper {

struct StatusSlot {
    ngx_atomic_t owner; // the pid that holds the slot (0: free)
    WorkerStats stats;
};

constexpr size_t status_slots = 128;

struct StatusZone {
    StatusSlot slots[status_slots];
};

// Adds the zone to the configuration (postconfiguration).
ngx_shm_zone_t *add_status_zone(ngx_conf_t *cf);

// Claims a free slot for this process (nullptr: none free, logged).
StatusSlot *claim_status_slot(ngx_shm_zone_t *zone, ngx_log_t *log);
void release_status_slot(StatusSlot *slot);

// The figures of every live worker.
std::vector<WorkerStats> read_status_zone(ngx_shm_zone_t *zone);

} // namespace event_piper
