package imgcache

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Held read connections.
//
// go-redis checks a pooled connection every time a command takes one from the pool: it clears the
// socket's deadline and peeks at it with a non-blocking recvfrom, then updates the pool's state and
// metrics. On the 2-core reference machine a loopback GET on a held redis.Conn took 0.82-0.90x the
// time of one through the pool (paired, in a standalone module), about 0.95x in the bench suite's
// last full run (BENCHMARKS.md). A Cache's reads of a single Redis are few at a time already
// (readsInFlight, l2batch.go), so it holds up to that many of the client's connections for them,
// as redis.Conns: a read takes a free one, or goes through the pool as before when none is free.
// Only reads use them (GET and MGET), because only a read can be made again safely when the
// connection turns out to be dead.
//
// What a held connection gives up, and how each is made good:
//   - The health check. A connection that died while held (Redis restarted or closed it, a
//     failover, a proxy's idle timeout) fails the next read on it. That connection is dropped and
//     the read is made again at once through the pool, whose check finds the dead ones: the caller
//     sees a read, as the pool would have given it. A timeout is not made again: Redis is slow,
//     not the connection dead, and a second wait would only add to the read's latency.
//   - The pool's limits. A held connection is given back once half of ConnMaxLifetime has passed
//     since it was taken (the pool does not say how long it had lived already, so it lives at most
//     1.5 times ConnMaxLifetime in all), or when it has been idle for ConnMaxIdleTime; and after
//     heldConnMaxAge whatever the pool's settings, so that whatever go-redis does with the pool's
//     connections over time (moving them off a node that a DNS failover demoted, a maintenance
//     handoff) reaches the held ones within that time. Each read gives back every free connection
//     past these limits, so a Cache that stops reading Redis keeps its connections until its next
//     read or Close.
//   - Hooks. A redis.Conn runs the client's hooks as they were when it was made, and a Cache makes
//     its connections when its first reads need them: hooks added to the client before the Cache's
//     first Redis read see every read; hooks added later see reads on held connections only once
//     those are replaced (heldConnMaxAge at most). A hook sees a held read's command wrapped in
//     noRetry, not as go-redis's own type.
//   - Client-side caching. A redis.Conn does not read go-redis's client-side cache, so a client with
//     one gets no held connections unless Options.ReadConns asks for them.
//
// The connections come out of the client's pool and go back to it when the Cache is closed: the
// default takes at most a quarter of PoolSize (MaxActiveConns if smaller), and none from a pool of
// fewer than 4, so the service's own commands and the Cache's writes keep the rest.

// heldConnMaxAge is the longest a connection is held, whatever the pool's ConnMaxLifetime: taking
// a new one from the pool every half minute costs nothing measurable.
const heldConnMaxAge = 30 * time.Second

// readConns are the connections a l2 holds for its reads. The zero value holds none.
type readConns struct {
	client  *redis.Client // nil: none are held
	max     int
	maxLife int64 // clock nanoseconds (coarseNow)
	maxIdle int64 // clock nanoseconds; 0: no limit

	mu     sync.Mutex
	free   []*heldConn
	n      int // held: free and in use
	closed bool
}

// heldConn is a held connection and its times.
type heldConn struct {
	*redis.Conn
	born, used int64 // coarseNow readings: when it was taken from the pool, and last given back
}

// readConnsFor returns how many connections to hold for c's reads: want (Options.ReadConns) if it
// is positive, none if it is negative, the default if it is 0. It refuses a count that would leave
// the pool nothing.
func readConnsFor(c *redis.Client, want int) (int, error) {
	if want < 0 {
		return 0, nil
	}
	o := c.Options()
	size := o.PoolSize
	if o.MaxActiveConns > 0 {
		size = min(size, o.MaxActiveConns)
	}
	if want > 0 {
		if want >= size {
			return 0, fmt.Errorf("imgcache: Options.ReadConns is %d; the client's pool has %d connections, and the cache's writes and the service need some of them", want, size)
		}
		return min(want, readsInFlight), nil
	}
	if o.ClientSideCacheConfig != nil || o.ClientSideCache != nil {
		return 0, nil // a held connection would read past the client-side cache
	}
	return min(readsInFlight, size/4), nil
}

// init makes r hold up to n of client's connections, with client's lifetime limits.
func (r *readConns) init(client *redis.Client, n int) {
	if n <= 0 {
		return
	}
	o := client.Options()
	r.client, r.max = client, n
	r.maxLife, r.maxIdle = int64(heldConnMaxAge), int64(o.ConnMaxIdleTime)
	if o.ConnMaxLifetime > 0 {
		// go-redis does not say how long a pooled connection has lived already: held for half
		// ConnMaxLifetime, a connection lives at most 1.5 times it in all.
		r.maxLife = min(r.maxLife, int64(o.ConnMaxLifetime/2))
	}
}

// take returns a free held connection, or a new one if fewer than max are held, or nil (go through
// the pool). A connection past its lifetime or idle time is given back and replaced.
func (r *readConns) take() *heldConn {
	if r.client == nil {
		return nil
	}
	now := coarseNow()
	r.mu.Lock()
	// Every free connection past its lifetime or idle time goes back to the pool, not only the one
	// this read would take: serial reads reuse the last one given back, and after a burst the others
	// would otherwise stay out of the pool, idle, for as long as the reads stay serial.
	var old []*heldConn
	kept := r.free[:0]
	for _, h := range r.free {
		if r.expired(h, now) {
			old = append(old, h)
			r.n--
		} else {
			kept = append(kept, h)
		}
	}
	clear(r.free[len(kept):])
	r.free = kept
	var h *heldConn
	dial := false
	switch n := len(r.free); {
	case n > 0:
		h = r.free[n-1]
		r.free = r.free[:n-1]
	case !r.closed && r.n < r.max:
		r.n++
		dial = true
	}
	r.mu.Unlock()
	for _, o := range old {
		_ = o.Close() // back to the pool, which checks it as it checks its own
	}
	if dial {
		h = &heldConn{Conn: r.client.Conn(), born: now, used: now}
	}
	return h // nil: go through the pool
}

func (r *readConns) expired(h *heldConn, now int64) bool {
	return now-h.born >= r.maxLife || (r.maxIdle > 0 && now-h.used >= r.maxIdle)
}

// put gives back a connection take returned: for the next read if ok, else (it failed) to the
// pool, which drops it if go-redis has marked it bad.
func (r *readConns) put(h *heldConn, ok bool) {
	h.used = coarseNow()
	r.mu.Lock()
	if ok && !r.closed {
		r.free = append(r.free, h)
		r.mu.Unlock()
		return
	}
	r.n--
	r.mu.Unlock()
	_ = h.Close()
}

// close gives every held connection back to the pool: the free ones now, the ones in use when
// their reads end.
func (r *readConns) close() {
	r.mu.Lock()
	r.closed = true
	free := r.free
	r.free = nil
	r.n -= len(free)
	r.mu.Unlock()
	for _, h := range free {
		_ = h.Close()
	}
}

// held reports how many connections r holds, free and in use.
func (r *readConns) held() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n
}

// processRead runs cmd, a read, on a held connection when one is free, else through the client's
// pool. If a held connection fails with anything but an absent key (redis.Nil), it is dropped,
// and unless the failure was a timeout or ctx has ended, cmd runs again through the pool, with
// go-redis's retries (see above).
//
// A reply error drops the connection too: go-redis marks a connection bad after some replies
// (READONLY, a MOVED to the same node), and a redis.Conn then fails every later command without
// sending it. And it is made again through the pool because go-redis retries some replies there
// (LOADING, MASTERDOWN, TRYAGAIN), which it must not retry on a held connection: its retries would
// wait out their backoff (8 ms and more, doubling) and, after a connection error, meet the same
// dead connection, which a redis.Conn never replaces, until the call's deadline. A reply that fails
// again costs one more round trip; Redis sends none to a cache's reads of its own keys.
func (l *l2) processRead(ctx context.Context, cmd redis.Cmder) error {
	h := l.conns.take()
	if h == nil {
		return l.rdb.Process(ctx, cmd)
	}
	err := l.processHeld(ctx, h, cmd)
	if err == nil || errors.Is(err, redis.Nil) || failedSlowly(err) || errors.Is(err, redis.ErrPoolTimeout) || ctx.Err() != nil {
		return err
	}
	return l.rdb.Process(ctx, cmd)
}

// processHeld runs cmd on h without go-redis's retries, and gives h back: for the next read if
// cmd got a value or an absent key, else (an error, or a panic in a hook) to the pool.
func (l *l2) processHeld(ctx context.Context, h *heldConn, cmd redis.Cmder) error {
	healthy := false
	defer func() { l.conns.put(h, healthy) }()
	err := h.Process(ctx, noRetry{cmd})
	healthy = err == nil || errors.Is(err, redis.Nil)
	return err
}

// noRetry is a command that go-redis must not retry (Cmder.NoRetry).
type noRetry struct{ redis.Cmder }

func (noRetry) NoRetry() bool { return true }
