// The shared-memory status zone (see ngx_status_zone.hpp).
#include "ngx_status_zone.hpp"

#include "ngx_conf.hpp"

#include <cerrno>
#include <csignal>

namespace event_piper {

bool process_alive(ngx_atomic_uint_t pid) {
    return pid != 0 && !(kill(static_cast<pid_t>(pid), 0) == -1 && errno == ESRCH);
}

namespace {

ngx_int_t init_zone(ngx_shm_zone_t *zone, void *data) noexcept {
    if (data != nullptr) { // a reload: keep the zone of the previous cycle
        zone->data = data;
        return NGX_OK;
    }
    auto *shpool = reinterpret_cast<ngx_slab_pool_t *>(zone->shm.addr);
    if (zone->shm.exists) {
        zone->data = shpool->data;
        return NGX_OK;
    }
    void *slots = ngx_slab_calloc(shpool, sizeof(StatusZone));
    if (slots == nullptr) {
        return NGX_ERROR;
    }
    shpool->data = slots;
    zone->data = slots;
    // The instance names its relay sockets (abstract namespace: unique on the host).
    init_relay_board(static_cast<StatusZone *>(slots)->board,
                     (static_cast<uint64_t>(ngx_pid) << 32) ^ static_cast<uint64_t>(ngx_time()) ^
                         static_cast<uint64_t>(ngx_random()));
    return NGX_OK;
}

} // namespace

ngx_shm_zone_t *add_status_zone(ngx_conf_t *cf) {
    ngx_str_t name = ngx_string("event_piper_status");
    ngx_shm_zone_t *zone = ngx_shared_memory_add(cf, &name, 8 * ngx_pagesize + sizeof(StatusZone),
                                                 &ngx_event_piper_module);
    if (zone != nullptr) {
        zone->init = init_zone;
    }
    return zone;
}

StatusSlot *claim_status_slot(ngx_shm_zone_t *zone, ngx_log_t *log) {
    if (zone == nullptr || zone->data == nullptr) {
        return nullptr;
    }
    auto *z = static_cast<StatusZone *>(zone->data);
    auto me = static_cast<ngx_atomic_uint_t>(ngx_pid);
    for (StatusSlot &slot : z->slots) {
        ngx_atomic_uint_t owner = slot.owner;
        if (!process_alive(owner) && ngx_atomic_cmp_set(&slot.owner, owner, me)) {
            slot.stats.store(WorkerStats{});
            RelaySlot &r = slot.relay;
            r.bound = 0;
            r.seq = 0;
            r.overruns = 0;
            r.waiting_since_ms = 0;
            r.beat_ms = 0;
            for (auto &word : r.interest) {
                word = 0;
            }
            return &slot;
        }
    }
    ngx_log_error(NGX_LOG_WARN, log, 0,
                  "event_piper: no free status slot, this worker is missing from the status");
    return nullptr;
}

void release_status_slot(StatusSlot *slot) {
    if (slot != nullptr) {
        slot->stats.store(WorkerStats{});
        slot->relay.bound = 0;
        slot->owner = 0; // free for the next worker
    }
}

std::vector<WorkerStats> read_status_zone(ngx_shm_zone_t *zone) {
    std::vector<WorkerStats> workers;
    if (zone == nullptr || zone->data == nullptr) {
        return workers;
    }
    const auto *z = static_cast<StatusZone *>(zone->data);
    // The listener's holder is the one shared memory names: a frozen worker that lost the role
    // still shows what it published before it stopped.
    uint64_t holder = z->board.holder.load();
    for (const StatusSlot &slot : z->slots) {
        ngx_atomic_uint_t owner = slot.owner;
        if (process_alive(owner)) {
            workers.emplace_back();
            slot.stats.load(workers.back()); // zero figures in the unlikely case it fails
            workers.back().pid = static_cast<int64_t>(owner);
            if (holder != 0) {
                workers.back().listener_holder = (holder >> 8) == owner ? 1 : 0;
            }
        }
    }
    return workers;
}

} // namespace event_piper
