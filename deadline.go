package imgcache

import (
	"container/heap"
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// Deadlines of Redis calls without a runtime timer each.
//
// Every Redis call runs under a context whose deadline is L2Timeout away. context.WithTimeout arms a
// runtime timer for it, and a timer due before the scheduler's planned wake-up makes the runtime wake
// another thread to re-plan its sleep: on the 2-core reference machine that costs about 3.5 us of a
// 35 us loopback GET (BenchmarkCallContext), a tenth of a Redis hit.
//
// A callCtx carries its deadline as a value instead. go-redis applies it to the socket
// (ContextTimeoutEnabled, which New requires) and net.Dialer to a dial, with no timer. For the waits
// that go-redis makes off the socket (for a pooled connection, between retries) its Done channel is
// shared by every call whose deadline falls in the same clock tick, and the coarse clock's goroutine
// closes it once the tick has passed. So a call that waits ends at most a tick or two (plus that
// goroutine's scheduling delay) after its deadline, and never before it.
//
// What a callCtx gives up: the caller's cancellation. Done closes at the deadline only, so a caller
// that leaves while its call waits for a pooled connection or between retries no longer cuts the
// wait short; the wait still ends by L2Timeout. (The socket never watched cancellation: go-redis
// bounds reads and writes by deadlines only.) A caller that has left is still never sent to Redis,
// and its call does not count against Redis, as before: see l2.call.

// callCtx is the context of one Redis call: the caller's values, and a deadline.
type callCtx struct {
	context.Context // the caller's, for its values; its Done and Err are not used

	deadline int64 // preciseNow reading
	tick     *deadlineTick
}

// newCallCtx returns a context for a Redis call that must end by deadline, a preciseNow reading, or
// nil when no clock goroutine runs to close its Done channel (every Cache is closed).
func newCallCtx(parent context.Context, deadline int64) context.Context {
	t := deadlineTicks.get(deadline)
	if t == nil {
		return nil
	}
	return &callCtx{Context: parent, deadline: deadline, tick: t}
}

func (c *callCtx) Deadline() (time.Time, bool) {
	return clockEpoch.Add(time.Duration(c.deadline)), true
}

func (c *callCtx) Done() <-chan struct{} { return c.tick.done }

func (c *callCtx) Err() error {
	select {
	case <-c.tick.done:
		return context.DeadlineExceeded
	default:
		return nil
	}
}

func (c *callCtx) String() string { return "imgcache.callCtx" }

// deadlineTick is the Done channel of every call whose deadline falls in one clock tick.
type deadlineTick struct {
	at   int64 // preciseNow reading: the end of the tick, when done is closed
	done chan struct{}
}

// tickSet holds the open deadline ticks. A read finds its tick with one atomic load in recent; the
// first call of a tick creates it under mu, once.
type tickSet struct {
	running atomic.Bool  // a clock goroutine runs (acquireClock)
	next    atomic.Int64 // at of the earliest open tick, or max int64
	recent  [64]atomic.Pointer[deadlineTick]

	mu   sync.Mutex // protects open and due, and orders get's running check against stop
	open map[int64]*deadlineTick
	due  tickHeap
}

var deadlineTicks = tickSet{open: make(map[int64]*deadlineTick)}

func init() { deadlineTicks.next.Store(maxInt64) }

const maxInt64 = int64(^uint64(0) >> 1)

// get returns the open tick that ends at deadline, rounded up to the clock tick, or nil when no
// clock goroutine runs.
func (s *tickSet) get(deadline int64) *deadlineTick {
	at := (deadline + int64(clockTick) - 1) / int64(clockTick) * int64(clockTick)
	slot := &s.recent[uint64(at/int64(clockTick))%uint64(len(s.recent))]
	if t := slot.Load(); t != nil && t.at == at && s.running.Load() {
		return t
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.running.Load() {
		return nil
	}
	t := s.open[at]
	if t == nil {
		t = &deadlineTick{at: at, done: make(chan struct{})}
		s.open[at] = t
		heap.Push(&s.due, t)
		s.next.Store(s.due[0].at)
	}
	slot.Store(t)
	return t
}

// expire closes every tick that has ended by now. The clock goroutine calls it every tick.
func (s *tickSet) expire(now int64) {
	if s.next.Load() > now {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.due) > 0 && s.due[0].at <= now {
		t := heap.Pop(&s.due).(*deadlineTick)
		delete(s.open, t.at)
		close(t.done)
	}
	if len(s.due) > 0 {
		s.next.Store(s.due[0].at)
	} else {
		s.next.Store(maxInt64)
	}
}

// setRunning records whether a clock goroutine runs. Ticks still open when it stops stay open until
// the next one starts: calls still running then, on closed caches, keep their socket deadlines.
func (s *tickSet) setRunning(on bool) {
	s.mu.Lock()
	s.running.Store(on)
	s.mu.Unlock()
}

// tickHeap orders open ticks by their end.
type tickHeap []*deadlineTick

func (h tickHeap) Len() int           { return len(h) }
func (h tickHeap) Less(i, j int) bool { return h[i].at < h[j].at }
func (h tickHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *tickHeap) Push(x any)        { *h = append(*h, x.(*deadlineTick)) }
func (h *tickHeap) Pop() any {
	old := *h
	t := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	return t
}
