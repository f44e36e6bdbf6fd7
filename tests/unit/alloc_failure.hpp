// Allocation failures on demand, for tests of all-or-nothing operations: the unit test binary
// replaces the global operator new (alloc_failure.cpp) with one that can be told to throw
// std::bad_alloc at the Nth allocation of this thread.
#pragma once

namespace event_piper::testing {

// While it lives, the `nth` allocation from now on this thread throws (1: the next one); the
// ones after it succeed again.
class FailingAllocation {
public:
    explicit FailingAllocation(int nth);
    ~FailingAllocation();
    FailingAllocation(const FailingAllocation &) = delete;
    FailingAllocation &operator=(const FailingAllocation &) = delete;
    bool failed() const; // the allocation failed
};

} // namespace event_piper::testing
