// The global operator new of the unit test binary (see alloc_failure.hpp): malloc, unless a
// FailingAllocation has counted down to this allocation.
#include "alloc_failure.hpp"

#include <cstdlib>
#include <new>

namespace {

thread_local int countdown = 0; // 0: no failure planned
thread_local bool fired = false;

} // namespace

void *operator new(std::size_t size) {
    if (countdown > 0 && --countdown == 0) {
        fired = true;
        throw std::bad_alloc();
    }
    if (void *p = std::malloc(size != 0 ? size : 1)) {
        return p;
    }
    throw std::bad_alloc();
}

void operator delete(void *p) noexcept {
    std::free(p);
}

void operator delete(void *p, std::size_t) noexcept {
    std::free(p);
}

namespace event_piper::testing {

FailingAllocation::FailingAllocation(int nth) {
    countdown = nth;
    fired = false;
}

FailingAllocation::~FailingAllocation() {
    countdown = 0;
}

bool FailingAllocation::failed() const {
    return fired;
}

} // namespace event_piper::testing
