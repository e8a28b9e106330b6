package imgcache

import "sync"

// flightGroup makes concurrent loads of one key share a single call, like x/sync/singleflight, but
// keyed by Key (no string to build), with each flight run in a goroutine of its own so that a caller
// whose context ends can leave while the load goes on for the others, and with a close that refuses
// new flights and waits for running ones.
type flightGroup[V any] struct {
	mu     sync.Mutex // protects m and closed, and orders wg.Add before close's wg.Wait
	m      map[Key]*flight[V]
	closed bool
	wg     sync.WaitGroup // running flights
	// seq returns a key's invalidation sequence: a flight that began before an invalidation of its
	// key is not handed to new callers, who start afresh (the old flight may still be running).
	seq func(Key) uint64
}

// flight is one shared load. val and err are written, under the group's mutex, before done is
// closed, and read only after.
type flight[V any] struct {
	done  chan struct{}
	val   V
	err   error
	stale bool    // val is a stale value served by the fail-safe
	seq   uint64  // the key's invalidation sequence when the flight began
	ctx   loadCtx // runFlight's context once it registers or loads: in the flight, not one more allocation
}

// do returns the flight in progress for k, or starts one that runs start in a new goroutine; joined
// reports whether the flight was already running. It returns ErrClosed once close has been called.
func (g *flightGroup[V]) do(k Key, start func(*flight[V])) (f *flight[V], joined bool, err error) {
	f, joined, err = g.begin(k)
	if err == nil && !joined {
		go func() {
			defer g.wg.Done()
			start(f)
		}()
	}
	return f, joined, err
}

// begin returns the flight in progress for k (joined), or a new one that the caller must run,
// publish and release, and then call g.wg.Done: close waits for it. A caller who runs the flight in
// its own goroutine saves the handoff to another goroutine and back (about 20us of thread wake-ups
// on a busy 2-core machine). It returns ErrClosed once close has been called.
func (g *flightGroup[V]) begin(k Key) (f *flight[V], joined bool, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, false, ErrClosed
	}
	if f, ok := g.m[k]; ok && !g.outdatedLocked(k, f) {
		return f, true, nil
	}
	if g.m == nil {
		g.m = make(map[Key]*flight[V])
	}
	f = &flight[V]{done: make(chan struct{})}
	if g.seq != nil {
		f.seq = g.seq(k)
	}
	g.m[k] = f
	g.wg.Add(1)
	return f, false, nil
}

// claim is do for a batch of distinct keys: for each it returns the flight running for it
// (joined[i]) or a new one, which the caller runs, publishes and releases. If it made any, the group
// counts the caller as one running flight until it calls g.wg.Done, so close waits for it. It
// returns ErrClosed once close has been called.
func (g *flightGroup[V]) claim(ks []Key) (fs []*flight[V], joined []bool, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, nil, ErrClosed
	}
	fs, joined = make([]*flight[V], len(ks)), make([]bool, len(ks))
	started := false
	for i, k := range ks {
		if f, ok := g.m[k]; ok && !g.outdatedLocked(k, f) {
			fs[i], joined[i] = f, true
			continue
		}
		if g.m == nil {
			g.m = make(map[Key]*flight[V])
		}
		f := &flight[V]{done: make(chan struct{})}
		if g.seq != nil {
			f.seq = g.seq(k)
		}
		g.m[k], fs[i], started = f, f, true
	}
	if started {
		g.wg.Add(1)
	}
	return fs, joined, nil
}

// outdatedLocked reports whether f began before an invalidation of k that ran since: its result
// may predate that invalidation, so a caller who comes after it must not get it.
func (g *flightGroup[V]) outdatedLocked(k Key, f *flight[V]) bool {
	return g.seq != nil && f.seq != g.seq(k)
}

// tryStart starts a flight for k unless one is running; it reports whether it started one.
func (g *flightGroup[V]) tryStart(k Key, start func(*flight[V])) bool {
	g.mu.Lock()
	if _, running := g.m[k]; running || g.closed {
		g.mu.Unlock()
		return false
	}
	g.mu.Unlock()
	_, joined, err := g.do(k, start)
	return err == nil && !joined
}

// publish hands the flight's result to its callers, present and future: callers that join the
// flight after publish get the result at once. A flight publishes once; later calls are ignored,
// and report false. Callers store the result in the cache before they publish.
func (g *flightGroup[V]) publish(f *flight[V], val V, err error, stale bool) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-f.done:
		return false
	default:
	}
	f.val, f.err, f.stale = val, err, stale
	close(f.done)
	return true
}

// release removes the flight, so that the next caller of k starts afresh. A flight can publish
// early (a soft timeout's stale value) and release only when its load has finished, so that no
// second load of k starts meanwhile.
func (g *flightGroup[V]) release(k Key, f *flight[V]) {
	g.mu.Lock()
	if g.m[k] == f {
		delete(g.m, k)
	}
	g.mu.Unlock()
}

// close refuses new flights and waits for the running ones to finish.
func (g *flightGroup[V]) close() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	g.wg.Wait()
}
