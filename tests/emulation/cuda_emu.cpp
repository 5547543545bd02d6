// The scheduler behind cuda_emu.h: runs one launch on the calling thread,
// block after block, the threads of a block as fibers that switch only at
// barriers. Linked into every emulated kernel library.
//
// A fiber is made once (ucontext, which costs system calls) and then lives
// on: it runs the kernel's body for one block after another, and switches
// with GCC's __builtin_setjmp/__builtin_longjmp (stack and frame pointer,
// resume address; no signal mask, no cleanup handlers). swapcontext's two
// system calls per switch took 85% of an emulated training step.

#include "cuda_emu.h"

#include <cxxabi.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;

namespace emu {
namespace {

// Kernel threads keep small arrays at most; an overflow hits a guard page.
const size_t STACK = 256 * 1024, GUARD = 4096;

// Runnable: resumes into the body (or into it anew, from Done at a block's
// start); Done: finished its block, parked in `park`.
enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
    void* at[5];   // where it continues (a __builtin_setjmp buffer)
    char* stack;   // GUARD + STACK bytes from mmap, the guard at the low end
    State state;
    bool started;  // it has entered `fiber_main` (and so `at` is set)
};

// The launch in progress on this OS thread.
struct Scheduler {
    void* home[5];                // the scheduler's side of every switch
    std::vector<Fiber> fibers;    // grows to the largest block seen
    int threads = 0;              // per block
    int current = -1;             // linear index of the running thread; -1 between fibers
    void (*body)(void*) = nullptr;
    void* ctx = nullptr;
    std::vector<uint64_t> offered;    // per thread, for warp_exchange
    std::vector<unsigned char> dyn;   // the block's dynamic shared memory
    uint64_t seed = 0;

    uint32_t random() {  // splitmix64, reseeded by every launch so runs repeat
        uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return (uint32_t)(z ^ (z >> 31));
    }

    ~Scheduler() {
        for (Fiber& f : fibers) munmap(f.stack, GUARD + STACK);
    }
};
thread_local Scheduler sched;

// Save this fiber's place, mark it `s` and go back to the scheduler.
// (Not inlined: a __builtin_longjmp must not land in its own function.)
__attribute__((noinline)) void switch_home(State s) {
    Scheduler& sc = sched;
    Fiber& f = sc.fibers[sc.current];
    f.state = s;
    if (__builtin_setjmp(f.at) == 0) __builtin_longjmp(sc.home, 1);
}

// A fiber's whole life: one block's body after another.
void fiber_main() {
    for (;;) {
        sched.body(sched.ctx);
        switch_home(State::Done);
    }
}

void yield(State s) {
    if (sched.current < 0) abort();  // a barrier outside a kernel thread
    switch_home(s);
}

// Run fiber `t` until its next switch home.
__attribute__((noinline)) void resume(int t) {
    Scheduler& sc = sched;
    Fiber& f = sc.fibers[t];
    sc.current = t;
    if (__builtin_setjmp(sc.home) == 0) {
        if (f.started) __builtin_longjmp(f.at, 1);
        // First run: onto its own stack, once (setcontext's system call).
        f.started = true;
        ucontext_t uc;
        getcontext(&uc);
        uc.uc_stack.ss_sp = f.stack + GUARD;
        uc.uc_stack.ss_size = STACK;
        uc.uc_link = nullptr;  // fiber_main never returns
        makecontext(&uc, fiber_main, 0);
        setcontext(&uc);
    }
    sc.current = -1;
}

// Why `l` would not launch on a GPU, or null.
const char* check_limits(const Launch& l) {
    unsigned long long threads = (unsigned long long)l.block[0] * l.block[1] * l.block[2];
    if (!l.grid[0] || !l.grid[1] || !l.grid[2] || !threads) return "a grid or block dimension is 0";
    if (l.block[0] > 1024 || l.block[1] > 1024 || l.block[2] > 64 || threads > 1024)
        return "more than 1024 threads per block (or block y > 1024, z > 64)";
    if (l.grid[0] > 0x7fffffffu || l.grid[1] > 65535 || l.grid[2] > 65535)
        return "grid x above 2^31-1 or grid y, z above 65535";
    if (l.shared_bytes > 48 * 1024) return "more than 48 KiB of dynamic shared memory (needs an opt-in)";
    return nullptr;
}

// Run the current block; false with `why` set when threads wait at barriers
// that can never complete (the fibers are then made anew at the next launch).
bool run_block(std::string& why) {
    Scheduler& sc = sched;
    int n = sc.threads;
    for (int t = 0; t < n; ++t) sc.fibers[t].state = State::Runnable;
    std::vector<int> order(n);
    for (int t = 0; t < n; ++t) order[t] = t;
    for (;;) {
        // Every runnable thread up to its next barrier or its end, in a new
        // order each time, so results that depend on it (a missing barrier) show.
        for (int i = n - 1; i > 0; --i) std::swap(order[i], order[sc.random() % (i + 1)]);
        for (int t : order) {
            if (sc.fibers[t].state != State::Runnable) continue;
            threadIdx = {t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
            resume(t);
        }
        int done = 0, at_block = 0, at_warp = 0;
        for (int t = 0; t < n; ++t) {
            State s = sc.fibers[t].state;
            done += s == State::Done;
            at_block += s == State::AtBlockBarrier;
            at_warp += s == State::AtWarpBarrier;
        }
        if (done == n) return true;
        bool released = false;
        if (at_block == n) {
            for (int t = 0; t < n; ++t) sc.fibers[t].state = State::Runnable;
            released = true;
        }
        for (int w = 0; w < n; w += 32) {
            int end = w + 32 < n ? w + 32 : n, waiting = 0;
            for (int t = w; t < end; ++t) waiting += sc.fibers[t].state == State::AtWarpBarrier;
            if (waiting < end - w) continue;
            for (int t = w; t < end; ++t) sc.fibers[t].state = State::Runnable;
            released = true;
        }
        if (!released) {
            why = std::to_string(at_block) + " thread(s) wait at __syncthreads, " + std::to_string(at_warp) +
                  " at a warp barrier (__syncwarp, shuffle, vote), " + std::to_string(done) +
                  " returned: a barrier in divergent code or after an early return";
            return false;
        }
    }
}

}  // namespace

int launch(const Launch& l, void (*body)(void*), void* ctx, char* err, size_t err_len) {
    auto fail = [&](const std::string& what) {
        snprintf(err, err_len, "%s (grid %ux%ux%u, block %ux%ux%u, %u bytes of dynamic shared memory)",
                 what.c_str(), l.grid[0], l.grid[1], l.grid[2], l.block[0], l.block[1], l.block[2],
                 l.shared_bytes);
        return 1;
    };
    if (sched.current >= 0) return fail("a launch from inside a kernel");
    if (const char* why = check_limits(l)) return fail(std::string("would not launch on a GPU: ") + why);
    int n = (int)(l.block[0] * l.block[1] * l.block[2]);
    while ((int)sched.fibers.size() < n) {
        void* p = mmap(nullptr, GUARD + STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED) return fail("out of memory for thread stacks");
        mprotect(p, GUARD, PROT_NONE);
        sched.fibers.push_back(Fiber{{}, static_cast<char*>(p), State::Done, false});
    }
    sched.threads = n;
    sched.body = body;
    sched.ctx = ctx;
    sched.offered.assign(n, 0);
    sched.seed = 1;
    sched.dyn.resize(l.shared_bytes);
    blockDim = {l.block[0], l.block[1], l.block[2]};
    gridDim = {l.grid[0], l.grid[1], l.grid[2]};
    for (unsigned z = 0; z < l.grid[2]; ++z)
        for (unsigned y = 0; y < l.grid[1]; ++y)
            for (unsigned x = 0; x < l.grid[0]; ++x) {
                blockIdx = {x, y, z};
                // Shared memory starts as garbage on a GPU; NaN here.
                memset(sched.dyn.data(), 0xff, sched.dyn.size());
                std::string why;
                if (!run_block(why)) {
                    // Threads stuck at barriers: abandon them mid-body.
                    for (Fiber& f : sched.fibers) f.started = false;
                    return fail("block (" + std::to_string(x) + ", " + std::to_string(y) + ", " +
                                std::to_string(z) + "): " + why);
                }
            }
    return 0;
}

void sync_block() { yield(State::AtBlockBarrier); }

void sync_warp() { yield(State::AtWarpBarrier); }

uint64_t warp_exchange(uint64_t mine, int src) {
    int t = sched.current;
    sched.offered[t] = mine;
    yield(State::AtWarpBarrier);
    int s = t / 32 * 32 + src;
    uint64_t got = src >= 0 && src < 32 && s < sched.threads ? sched.offered[s] : 0;
    yield(State::AtWarpBarrier);  // nobody offers again before every lane has read
    return got;
}

void* dynamic_shared() { return sched.dyn.data(); }

const char* describe(const char* const* type_names, int n) {
    std::string s;
    for (int i = 0; i < n; ++i) {
        int status = 0;
        char* d = abi::__cxa_demangle(type_names[i], nullptr, nullptr, &status);
        s += (i ? ", " : "") + std::string(status == 0 ? d : type_names[i]);
        free(d);
    }
    return strdup(s.c_str());  // kept for the life of the library, once per kernel
}

}  // namespace emu
