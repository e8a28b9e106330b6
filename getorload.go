package imgcache

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	mrand "math/rand/v2"
	"time"

	"github.com/redis/go-redis/v9"
)

// GetOrLoad returns the value for k, calling load to produce it when neither level has it, and then
// stores it in both. Concurrent calls for one key on this Cache share one load, which runs detached
// from any one caller: a caller whose ctx ends gets ctx's error while the load goes on for the others.
// Unless ctx's deadline is near, the read of Redis that may answer the call runs in the caller's
// goroutine, without ctx's cancellation, since it serves every caller of k: a caller whose ctx is
// cancelled during it returns when it ends (each Redis call is bounded by Options.L2Timeout).
// Across instances, a lease in Redis lets one instance load while the others wait for its value
// (unless Options.LocalLoadsOnly).
//
// A load error that wraps ErrNotFound is remembered for Options.NegativeTTL, in both levels, so no
// instance loads k again in that time; GetOrLoad returns ErrNotFound for it. Other load errors are
// returned wrapped and never cached; with Options.StaleTTL, a stale value is returned instead when
// there is one. Redis failures never fail GetOrLoad. It returns ErrClosed after Close, and an error
// for an invalid key, TTL or tag, or a nil load.
func (c *Cache[V]) GetOrLoad(ctx context.Context, k Key, load func(context.Context) (V, error), opts ...SetOption) (V, error) {
	var zero V
	if err := c.check(k); err != nil {
		return zero, err
	}
	if load == nil {
		return zero, fmt.Errorf("imgcache: get or load %s: nil load function", k)
	}
	so, err := c.setOptions(opts)
	if err != nil {
		return zero, fmt.Errorf("imgcache: get or load %s: %w", k, err)
	}
	if c.l1 != nil {
		if e, ok := c.l1.get(k); ok {
			if e.refreshFrom != 0 && coarseNow() >= e.refreshFrom {
				c.maybeRefresh(ctx, k, e, load, so)
			}
			return c.result(e)
		}
	}
	f, joined, err := c.flights.begin(k)
	switch {
	case err != nil:
		return zero, err
	case joined:
		c.stats.coalesced.Add(1)
	case ctx.Done() == nil:
		// A caller whose context can never end has no reason to leave before the load does, so
		// its flight runs in its own goroutine.
		func() {
			defer c.flights.wg.Done()
			c.runFlight(ctx, k, f, load, so, nil)
		}()
	default:
		// Any other caller's flight runs detached, so that the caller can leave while the load goes
		// on. But unless the caller's deadline is near, its start (L1's re-check and, unless it goes
		// straight to its registration, a read of Redis) runs here: an L2 hit then costs no
		// goroutine, and no handoff to one and back (about 20 us on the reference machine:
		// BenchmarkPaired, cancellable-ctx).
		start, done := c.readFirst(ctx, k, f)
		if done {
			c.flights.wg.Done()
			return c.flightResult(f)
		}
		st := start // only a handoff moves it to the heap
		go func() {
			defer c.flights.wg.Done()
			c.runFlightFrom(ctx, k, f, load, so, nil, &st)
		}()
	}
	select {
	case <-f.done:
		return c.flightResult(f)
	case <-ctx.Done():
		return zero, ctx.Err()
	}
}

// flightResult is what the published flight f answers.
func (c *Cache[V]) flightResult(f *flight[V]) (V, error) {
	if f.stale {
		c.stats.staleServed.Add(1)
	}
	return f.val, f.err
}

// errFlightPanicked is what the callers waiting on a flight get when the flight panicked (in a
// go-redis hook or a log handler: loaders' and codecs' panics are errors already) before it
// published anything. The panic goes on up the goroutine that ran the flight.
var errFlightPanicked = errors.New("imgcache: get or load: the flight for this key panicked")

// maxPlainReadCalls bounds the Redis calls of a flight's plain read, each under L2Timeout: the
// value, its tags' generations or the removal of an unreadable value, and once more of each when
// a trusted generation turns out to have moved.
const maxPlainReadCalls = 4

// runFlight is the shared body of GetOrLoad for one key. It runs in its own goroutine, under a context
// that keeps the first caller's values but not its cancellation, and that Close cancels. current is
// set for an early refresh: the entry being refreshed, which callers keep getting meanwhile.
func (c *Cache[V]) runFlight(callerCtx context.Context, k Key, f *flight[V], load func(context.Context) (V, error), so setOptions, current *l1entry[V]) {
	c.runFlightFrom(callerCtx, k, f, load, so, current, nil)
}

// flightStart is what the start of a flight found: L1's re-check and the choice of reads have been
// made, and the plain read of Redis too if read is set.
type flightStart[V any] struct {
	stale      *l1entry[V] // a stale value for the fail-safe, if one was found
	read, get  bool        // whether the flight read k plainly; whether its registration reads k
	failed     bool        // the plain read failed: Redis did not answer it
	withValues context.Context
}

// readFirst runs the start of GetOrLoad's flight f for k in the caller's goroutine: L1's re-check,
// and the plain read of Redis unless the flight goes straight to its registration. The read runs
// under a context without the caller's cancellation or deadline, as runFlight's does: the flight
// serves every caller of k. So the caller cannot leave during it, and it runs here only when the
// caller's context has no deadline, or one more than the read's longest time away
// (maxPlainReadCalls times L2Timeout); a caller whose context is cancelled during it returns when
// it ends, within a millisecond while Redis is healthy. done reports that f has published its
// value and been released; otherwise runFlightFrom goes on from start. A start whose withValues is
// nil is the flight's beginning: nothing was done here.
func (c *Cache[V]) readFirst(callerCtx context.Context, k Key, f *flight[V]) (start flightStart[V], done bool) {
	if callerCtx.Err() != nil {
		return start, false // the caller is leaving: it waits for nothing
	}
	if dl, ok := callerCtx.Deadline(); ok && c.l2 != nil && time.Until(dl) <= maxPlainReadCalls*c.l2.timeout {
		return start, false
	}
	finished := false
	defer func() {
		if !finished { // a panic: end the wait of the flight's callers, and let it go on up
			var zero V
			c.flights.publish(f, zero, errFlightPanicked, false)
			c.flights.release(k, f)
			c.flights.wg.Done()
		}
	}()
	ctx := context.WithoutCancel(callerCtx)
	start.withValues = ctx
	if done = c.recheckL1(k, f, &start); !done && c.l2 != nil {
		if start.read, start.get = c.chooseReads(nil); start.read {
			r := flightRead[V]{c: c, k: k, f: f, seq: f.seq, rkey: c.l2.key(k), stale: start.stale}
			var usable bool
			done, usable = r.plainRead(ctx)
			start.stale, start.failed = r.stale, !usable
		}
	}
	if done {
		c.flights.release(k, f)
	}
	finished = true
	return start, done
}

// recheckL1 re-checks L1 inside the flight: between this caller's L1 miss and the flight's start, an
// earlier flight for k may have stored its value and finished. Without the re-check that
// interleaving loads the same key twice. It reports that it published the value; otherwise it puts
// in start the stale value L1 keeps for the fail-safe, if any.
func (c *Cache[V]) recheckL1(k Key, f *flight[V], start *flightStart[V]) bool {
	if c.l1 == nil {
		return false
	}
	if e, ok := c.l1.recheck(k); ok {
		v, err := c.result(e)
		c.flights.publish(f, v, err, false)
		return true
	}
	if c.staleTTL > 0 {
		start.stale = c.l1.peekStale(k)
	}
	return false
}

// chooseReads decides how a flight reads Redis: read, whether it first reads k as Get does; get,
// whether its registration reads k (in the same round trip). While most flights miss in Redis, the
// registration's read is the only one (speculate).
func (c *Cache[V]) chooseReads(current *l1entry[V]) (read, get bool) {
	read = !c.guard.skipRead()
	get = read
	if read && current == nil && c.speculate() {
		read = false
	}
	return read, get
}

// flightRead is a flight's reading of k from Redis: the value it publishes, and the stale one it
// keeps for the fail-safe.
type flightRead[V any] struct {
	c       *Cache[V]
	k       Key
	f       *flight[V]
	seq     uint64 // k's invalidation sequence when the flight began
	rkey    string
	current *l1entry[V] // the entry an early refresh replaces; nil otherwise
	stale   *l1entry[V] // a stale value for the fail-safe, if one is at hand
}

// judge serves a value read from Redis and checked (decodeChecked) if it is fresh (and, for an early
// refresh, newer than the value being refreshed); a stale one is kept for the fail-safe. usable is
// false when checking the value's stamp failed on a Redis error.
func (r *flightRead[V]) judge(ctx context.Context, e *l1entry[V], fresh bool, err error, record bool) (hit, usable bool) {
	c := r.c
	if record {
		c.guard.record(ctx, fresh)
	}
	switch {
	case fresh && (r.current == nil || e.expMs > r.current.expMs): // not the value being refreshed
		c.l2.debug(ctx, "GET", r.rkey, "HIT")
		if r.current == nil { // an early refresh is not a lookup: its caller counted an L1 hit
			c.stats.l2Hits.Add(1)
		}
		c.fillL1(r.k, e, r.seq)
		v, err := c.result(e)
		c.flights.publish(r.f, v, err, false)
		return true, true
	case err == nil && r.stale == nil && !e.negative:
		r.stale = e // a stale value in Redis, kept by StaleTTL
	}
	c.l2.debug(ctx, "GET", r.rkey, "MISS")
	return false, !errors.Is(err, errL2Call)
}

// plainRead reads k as Get does. hit reports that it published a value; usable is false when Redis
// failed, and the flight loads without it.
func (r *flightRead[V]) plainRead(ctx context.Context) (hit, usable bool) {
	c := r.c
	_, e, fresh, got, err := c.readChecked(ctx, r.k, r.seq)
	switch {
	case !got && errors.Is(err, redis.Nil):
		c.l2.debug(ctx, "GET", r.rkey, "MISS")
		c.guard.record(ctx, false)
		usable = true
	case !got:
		c.countL2Error(err)
		c.l2.debug(ctx, "GET", r.rkey, "ERROR")
		return false, false
	default:
		hit, usable = r.judge(ctx, e, fresh, err, true)
	}
	if r.current == nil {
		c.noteL2Read(hit)
	}
	return hit, usable
}

// runFlightFrom is runFlight, going on from what readFirst did if start is not nil.
func (c *Cache[V]) runFlightFrom(callerCtx context.Context, k Key, f *flight[V], load func(context.Context) (V, error), so setOptions, current *l1entry[V], start *flightStart[V]) {
	// A flight that Redis answers needs no cancellation beyond its read's L2Timeout, so the context
	// Close cancels is made (detach) only when the flight goes on to register and load: an L2 hit
	// spares its allocations.
	ctx := callerCtx
	withoutCancel := false
	if start != nil && start.withValues == nil {
		start = nil // readFirst did nothing
	}
	switch _, ok := ctx.Deadline(); {
	case start != nil:
		ctx, withoutCancel = start.withValues, true
	case ok || ctx.Done() != nil: // one that can never end needs no detaching
		ctx, withoutCancel = context.WithoutCancel(callerCtx), true
	}
	var lctx *loadCtx
	detach := func() {
		if lctx == nil {
			values := ctx
			if !withoutCancel {
				// A context that cannot end may still pass Value on to one that has (a
				// hand-made detached context): context.Cause of the load's would report it.
				values = context.WithoutCancel(ctx)
			}
			lctx = &f.ctx
			lctx.init(values, c.base)
			ctx = lctx
		}
	}
	handedOff := false // the flight's end was handed to another goroutine, which does this instead
	defer func() {
		if !handedOff {
			if lctx != nil {
				lctx.end()
			}
			// Every return has published; only a panic (which goes on up) has not, and the
			// callers waiting on the flight must not wait for ever.
			var zero V
			c.flights.publish(f, zero, errFlightPanicked, false)
			c.flights.release(k, f)
		}
	}()

	seq := f.seq // k's invalidation sequence when the flight began
	var st flightStart[V]
	if start != nil {
		st = *start
	} else {
		st.stale = current
		if current == nil && c.recheckL1(k, f, &st) {
			return
		}
		if c.l2 != nil {
			st.read, st.get = c.chooseReads(current)
		}
	}
	stale := st.stale
	var reg registration
	var ls leaseState
	l2ok, absent := false, false // whether the load's result can be written to Redis; whether k was absent
	if c.l2 != nil {
		rkey := c.l2.key(k)
		fr := flightRead[V]{c: c, k: k, f: f, seq: seq, rkey: rkey, current: current, stale: stale}
		// First a plain read, as Get's: a hit costs one GET or MGET and no bookkeeping. Only a
		// miss registers, takes the lease and reads again, in one more round trip: another
		// instance may have stored the value in between.
		read, get := st.read, st.get
		usable := !st.failed
		if read && start == nil {
			var hit bool
			if hit, usable = fr.plainRead(ctx); hit {
				return
			}
		}
		if usable {
			detach()
			rs, err := c.registerMany(ctx, []Key{k}, so.tags, c.maxL2TTL(so), false, []bool{get}, c.leases)
			if len(rs) > 0 {
				// A lease taken here is released by obtain, whatever else failed.
				ls = leaseState{token: rs[0].lease, busy: rs[0].leaseBusy}
				if err == nil {
					err = rs[0].err
				}
			}
			switch {
			case err != nil: // failing, or refusing the bookkeeping (OOM at maxmemory with noeviction)
				c.countL2Error(err)
				if ls.busy { // Redis is failing: load here rather than wait on it
					// A busy lease may be this flight's own (go-redis retried its SET after a
					// lost reply): its release deletes it only if so.
					c.releaseLeaseLater(k, ls.token)
					ls = leaseState{}
				}
				slow := failedSlowly(err)
				if ls.token != "" && slow {
					// The lease may be held (its SET's reply was lost), and its release would wait
					// on the slow Redis too: it goes on without the callers.
					c.releaseLeaseLater(k, ls.token)
					ls = leaseState{}
				}
				// A speculating flight has not read k, and unless Redis is slow it may still answer
				// a read (it refused a script at maxmemory; on a Cluster, only the pattern epoch's
				// node is down): read as Get does, for a value to serve, or a stale one for the
				// fail-safe.
				if get && !read && !slow {
					if hit, _ := fr.plainRead(ctx); hit {
						if ls.token != "" {
							c.releaseLease(ctx, k, ls.token)
						}
						return
					}
				}
			case rs[0].data == nil:
				l2ok, absent, reg = true, get, rs[0].reg
				if get && !read {
					c.l2.debug(ctx, "GET", rkey, "MISS")
					c.guard.record(ctx, false)
					c.noteL2Read(false)
				}
			default:
				r := rs[0]
				e, fresh, err := c.decodeChecked(ctx, k, rkey, r.data, r.reg.st.entityGen, true, r.reg.st.tags, trustNone)
				hit, usable := fr.judge(ctx, e, fresh, err, !read)
				if !read {
					c.noteL2Read(hit)
				}
				if hit {
					switch {
					case ls.busy: // most likely another holder's, but possibly this flight's own
						c.releaseLeaseLater(k, ls.token)
					case ls.token != "":
						c.releaseLease(ctx, k, ls.token)
					}
					return
				}
				l2ok, reg = usable, r.reg
			}
		}
		stale = fr.stale
	}
	if current == nil {
		c.stats.misses.Add(1)
	}
	detach()
	obtain := func() (V, error) { return c.obtain(ctx, k, load, so, reg, ls, l2ok, absent, seq) }
	if current != nil { // an early refresh: nobody waits, and the current value stays
		v, err := obtain()
		stale := false
		if err != nil && !errors.Is(err, ErrNotFound) {
			c.postponeRefresh(k, current, seq)
			// Callers who joined get what they would have hit, or, if the value expired in L1
			// meanwhile, what the fail-safe would have given them: the value within StaleTTL.
			now := preciseNow()
			if c.inv.of(k) == seq && !current.negative && (current.exp > now || (c.staleTTL > 0 && current.staleUntil > now)) {
				v, err, stale = current.val, nil, current.exp <= now
			}
		}
		c.flights.publish(f, v, err, stale)
		return
	}
	if stale == nil || c.softTimeout == 0 {
		v, err := obtain()
		v, err, usedStale := c.failSafe(k, stale, v, err, seq)
		c.flights.publish(f, v, err, usedStale)
		return
	}
	// A stale value is at hand: callers wait at most SoftLoadTimeout for the load, then get the stale
	// value while the load goes on and refreshes the cache when it finishes.
	type result struct {
		v   V
		err error
	}
	done := make(chan result, 1)
	// The goroutine gets its own copies: a closure that outlives this frame would move every
	// variable it shares with the flight to the heap, on the hit path too.
	go func(ctx context.Context, reg registration, ls leaseState, l2ok, absent bool) {
		v, err := c.obtain(ctx, k, load, so, reg, ls, l2ok, absent, seq)
		done <- result{v, err}
	}(ctx, reg, ls, l2ok, absent)
	t := time.NewTimer(c.softTimeout)
	defer t.Stop()
	select {
	case r := <-done:
		v, err, usedStale := c.failSafe(k, stale, r.v, r.err, seq)
		c.flights.publish(f, v, err, usedStale)
	case <-t.C:
		if c.inv.of(k) != seq { // an invalidation ran: the stale value may be what it removed
			r := <-done
			c.flights.publish(f, r.v, r.err, false)
			return
		}
		c.stats.refreshes.Add(1)
		c.flights.publish(f, stale.val, nil, true)
		// The callers have their answer; the flight stays in the map until the load ends, so no
		// second load of k starts meanwhile. This goroutine may be a caller's own (an inline
		// flight), so the waiting moves to another.
		handedOff = true
		c.flights.wg.Add(1) // this flight holds the group open: no race with close's Wait
		go func(stale *l1entry[V], lctx *loadCtx) {
			defer c.flights.wg.Done()
			r := <-done
			c.failSafe(k, stale, r.v, r.err, seq)
			lctx.end()
			c.flights.release(k, f)
		}(stale, lctx)
	}
}

// speculate reports whether a GetOrLoad that L1 cannot answer should skip its plain read of Redis
// and read the value in its registration's round trip instead. A plain read costs one round trip
// for a hit and three for a miss (the read, the registration with the lease, the write); going
// straight to the registration costs two either way (a hit then releases the lease it took). So
// it pays while more than half of GetOrLoad's reads of Redis miss, as l2Misses, their moving
// average over about the last eight, estimates: on a cold or miss-heavy cache, not on a warm one.
func (c *Cache[V]) speculate() bool { return c.l2Misses.Load() > 1<<15 }

// noteL2Read adds the outcome of one GetOrLoad's read of Redis to l2Misses: its new value moves an
// eighth of the way to 1 for a miss, to 0 for a hit.
func (c *Cache[V]) noteL2Read(hit bool) {
	var x uint32
	if !hit {
		x = 1 << 16
	}
	for {
		old := c.l2Misses.Load()
		if c.l2Misses.CompareAndSwap(old, old-old/8+x/8) {
			return
		}
	}
}

// failSafe returns the load's result, or, when the load failed and a stale value is at hand, the
// stale value (usedStale), which it also puts back in L1 for a growing backoff so that the load is
// retried later rather than by every caller. Like every fill, that yields to an invalidation that
// ran since the flight began (seq): an invalidated value is never served stale.
func (c *Cache[V]) failSafe(k Key, stale *l1entry[V], v V, err error, seq uint64) (_ V, _ error, usedStale bool) {
	if err == nil || errors.Is(err, ErrNotFound) || stale == nil || stale.negative {
		return v, err, false
	}
	if c.inv.of(k) != seq || stale.staleUntil <= preciseNow() {
		return v, err, false // the stale value may be what was invalidated, or is past StaleTTL
	}
	if c.l1 != nil {
		now := preciseNow()
		if stale.staleUntil > now {
			e := c.l1.snapshot(k, stale)
			e.failures = min(stale.failures+1, 16)
			backoff := min(failSafeBackoff<<(e.failures-1), failSafeMaxBackoff)
			e.exp = min(now+int64(backoff), e.staleUntil)
			e.refreshFrom, e.stale = 0, true
			if !c.l1.addIf(k, &e, &c.inv, seq, false) {
				return v, err, false
			}
		}
	}
	return stale.val, nil, true
}

// postponeRefresh keeps a value whose early refresh failed, and lets the next refresh start only
// after failSafeBackoff, so that a failing database is not asked again on every hit.
// Like every fill, it yields to an invalidation that ran since the refresh began (seq).
func (c *Cache[V]) postponeRefresh(k Key, current *l1entry[V], seq uint64) {
	if c.l1 == nil {
		return
	}
	e := c.l1.snapshot(k, current)
	e.refreshFrom = preciseNow() + int64(failSafeBackoff)
	c.l1.addIf(k, &e, &c.inv, seq, false)
}

// The fail-safe retries a failing load after failSafeBackoff, doubling up to failSafeMaxBackoff.
const (
	failSafeBackoff    = 500 * time.Millisecond
	failSafeMaxBackoff = 30 * time.Second
)

// leaseState is what a flight's registration learnt of k's lease: token is the one it tried to
// take the lease with; busy reports that it found the lease taken (by another holder, or by this
// token through a retried SET); otherwise, with a token, the flight holds the lease.
type leaseState struct {
	token string
	busy  bool
}

// obtain produces k's value: through another instance's load, waiting on its lease, or by
// loading it here under a lease of its own (or none, with LocalLoadsOnly or Redis failing); a
// loaded value is stored in both levels. ls is the lease as the registration found it.
func (c *Cache[V]) obtain(ctx context.Context, k Key, load func(context.Context) (V, error), so setOptions, reg registration, ls leaseState, l2ok, absent bool, seq uint64) (V, error) {
	var zero V
	if c.loadTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.loadTimeout)
		defer cancel()
	}
	// held is the lease this load holds until its write releases it (or, if it makes none, the
	// deferred release does).
	var held *heldLease
	if ls.token != "" && (!ls.busy || !l2ok) {
		// A busy lease this flight will not wait on (Redis failed its registration) may be its
		// own, taken by a SET that go-redis retried after a lost reply: the deferred release
		// deletes it only if so.
		held = &heldLease{token: ls.token}
	}
	defer func() {
		if held != nil && !held.released {
			c.releaseLease(ctx, k, held.token)
		}
	}()
	if c.leases && l2ok && ls.busy {
		// A lease lives at most LockTTL: past that, whatever Redis says (it may not expire keys, or
		// its clock may stall), this load goes ahead without one.
		giveUp := time.Now().Add(c.lockTTL)
		for token := ls.token; ; {
			v, found, mine, err := c.awaitLease(ctx, k, seq, token, giveUp)
			if mine {
				held = &heldLease{token: token}
				break
			}
			if found {
				c.stats.lockWaits.Add(1)
				return v, err
			}
			// Past here the flight lets go of token, which may be its own unless a poll has just
			// seen another holder's (a busy SET that go-redis retried after a lost reply, or one
			// with no reply): it is released later, only if it holds token.
			if err != nil { // Close
				c.releaseLeaseLater(k, token)
				return zero, c.loadFailed(k, err)
			}
			if !time.Now().Before(giveUp) {
				c.releaseLeaseLater(k, token)
				break
			}
			old := token
			var got bool
			token, got, err = c.acquireLease(ctx, k)
			c.releaseLeaseLater(k, old)
			if err != nil {
				c.releaseLeaseLater(k, token)
				if err := ctx.Err(); err != nil { // Close: no load starts after it
					return zero, c.loadFailed(k, err)
				}
				break // Redis is failing: load without a lease
			}
			if got {
				held = &heldLease{token: token}
				break
			}
		}
	}
	if err := ctx.Err(); err != nil { // Close: no loader is called after it
		return zero, c.loadFailed(k, err)
	}
	c.stats.loads.Add(1)
	var start time.Time
	if c.beta > 0 { // the load's cost matters to early refresh alone: a clock reading spared
		start = time.Now()
	}
	v, err := callLoad(ctx, &c.flights.wg, load)
	end := time.Now() // for the cost, the expiries and the L1 stamp
	e := &l1entry[V]{val: v, tags: so.tags}
	if c.beta > 0 {
		cost := end.Sub(start)
		c.loadCost.Store((c.loadCost.Load()*7 + int64(cost)) / 8)
		e.delta = int64(cost)
	}
	ttl := c.l2TTL(so)
	switch {
	case err == nil:
	case errors.Is(err, ErrNotFound):
		e.val, e.negative, ttl, err = zero, true, c.negativeTTL(), ErrNotFound
		v = zero
	default:
		return v, c.loadFailed(k, err)
	}
	var data []byte
	e.expMs = end.Add(ttl).UnixMilli()
	if l2ok {
		var encErr error
		if data, encErr = c.encode(e.val, e.negative, e.expMs, reg.st); encErr != nil {
			// The callers still get the value; it is just not cached anywhere.
			c.stats.encodeErrors.Add(1)
			c.logError(ctx, "encode", k.String(), encErr)
			return v, err
		}
	}
	c.stampAt(e, ttl, int64(end.Sub(clockEpoch))) // preciseNow at end
	c.fillL1(k, e, seq)
	if l2ok && !c.writeVerified(ctx, []l2write{{k, data, c.pxTTL(ttl, e.negative), absent, reg, held}})[0] && c.l1 != nil {
		c.l1.remove(k)
	}
	return v, err
}

// loadFailed counts a failed load of what (a Key, or a batch's description) and wraps its error.
func (c *Cache[V]) loadFailed(what any, err error) error {
	c.stats.loadErrors.Add(1)
	if errors.Is(err, context.DeadlineExceeded) && c.loadTimeout > 0 {
		c.stats.loadTimeouts.Add(1)
	}
	return fmt.Errorf("imgcache: load %s: %w", what, err)
}

// stamp sets an entry's lifetimes, measured from now: fresh in L1 for the shorter of its TTL and
// (jittered) L1TTL, in Redis for ttl, kept for StaleTTL after that as a fail-safe, and eligible for
// early refresh from a point before its Redis expiry that grows with its load cost.
func (c *Cache[V]) stamp(e *l1entry[V], ttl time.Duration) { c.stampAt(e, ttl, preciseNow()) }

// stampAt is stamp with now read already (preciseNow), for a batch read at one moment.
func (c *Cache[V]) stampAt(e *l1entry[V], ttl time.Duration, now int64) {
	e.l2exp = now + int64(ttl)
	e.exp = now + int64(min(ttl, c.jittered(c.l1TTL)))
	e.staleUntil = e.exp
	if c.staleTTL > 0 && !e.negative {
		e.staleUntil = e.l2exp + int64(c.staleTTL)
	}
	if c.beta > 0 && !e.negative {
		delta := e.delta
		if delta == 0 {
			delta = max(c.loadCost.Load(), int64(time.Millisecond))
		}
		// Past ten times delta*beta before expiry XFetch's chance of refreshing is under e^-10:
		// reads before that point skip the computation.
		e.refreshFrom = e.l2exp - int64(10*float64(delta)*c.beta)
	}
}

// maybeRefresh is XFetch: refresh when now - delta*beta*ln(U) >= expiry, U uniform in (0, 1], with
// delta the value's load cost. At most one refresh per key, and MaxRefreshes in all, run at once.
func (c *Cache[V]) maybeRefresh(ctx context.Context, k Key, e *l1entry[V], load func(context.Context) (V, error), so setOptions) {
	delta := e.delta
	if delta == 0 {
		delta = max(c.loadCost.Load(), int64(time.Millisecond))
	}
	if float64(preciseNow())-float64(delta)*c.beta*math.Log(1-mrand.Float64()) < float64(e.l2exp) {
		return
	}
	select {
	case c.refreshSem <- struct{}{}:
	default:
		return // enough refreshes running; this key will be refreshed by a later hit or reloaded
	}
	if !c.flights.tryStart(k, func(f *flight[V]) {
		defer func() { <-c.refreshSem }()
		c.stats.refreshes.Add(1)
		c.runFlight(ctx, k, f, load, so, e)
	}) {
		<-c.refreshSem
	}
}

// TTLs. A default TTL is jittered; an explicit WithTTL is kept exactly.

func (c *Cache[V]) jittered(d time.Duration) time.Duration {
	if c.jitter == 0 {
		return d
	}
	return d - time.Duration(mrand.Float64()*c.jitter*float64(d))
}

// negativeTTL is the TTL of a remembered "not found": NegativeTTL, jittered, and never under
// Redis's millisecond (a PX of 0 is refused).
func (c *Cache[V]) negativeTTL() time.Duration {
	return max(c.jittered(c.negTTL), time.Millisecond)
}

func (c *Cache[V]) l2TTL(so setOptions) time.Duration {
	if so.explicitTTL {
		return so.ttl
	}
	return max(c.jittered(so.ttl), time.Millisecond)
}

// maxL2TTL is the longest a value written by this call may live in Redis: its meta hashes must
// outlive it.
func (c *Cache[V]) maxL2TTL(so setOptions) time.Duration {
	return max(so.ttl, c.negTTL) + c.staleTTL
}

// pxTTL is the Redis TTL of a value: its TTL plus the fail-safe's grace.
func (c *Cache[V]) pxTTL(ttl time.Duration, negative bool) time.Duration {
	if negative {
		return ttl
	}
	return ttl + c.staleTTL
}

// The distributed lease: <ns>:%l:{<ns>:<key>}, SET NX PX with a random token, released only by its
// holder. The braces make the value's key the lease's Redis Cluster hash tag: both live on one
// node, so a registration's read of the value and its SET NX of the lease, sent in that order in
// one pipeline, reach that node together and run back to back, as on a single Redis. Otherwise a
// holder could store the value and release the lease between the two (they ran on different
// nodes), and the registration would take the lease of a key it had just read as absent, and
// load it a second time.
func (c *Cache[V]) leaseKey(k Key) string {
	p, r := c.l2.prefix, k.redis()
	var buf [256]byte
	b := append(append(append(buf[:0], p...), "%l:{"...), p...)
	return string(append(append(b, r...), '}'))
}

// newLeaseToken is a lease's holder token: random, so that only its holder releases it.
func newLeaseToken() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (c *Cache[V]) acquireLease(ctx context.Context, k Key) (token string, got bool, err error) {
	token = newLeaseToken()
	err = c.l2.call(ctx, func(ctx context.Context) error {
		cmd := redis.NewStatusCmd(ctx, "set", c.leaseKey(k), token, "px", c.lockTTL.Milliseconds(), "nx")
		_ = c.l2.rdb.Process(ctx, cmd)
		return cmd.Err()
	})
	if errors.Is(err, redis.Nil) { // NX: someone else holds it
		return token, false, nil
	}
	return token, err == nil, err
}

var releaseLeaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)

// releaseLeaseLater releases k's lease, if token holds it, in a goroutine that Close waits for. A
// flight calls it, and holds the flight group open meanwhile, so the Add cannot race Close's Wait.
func (c *Cache[V]) releaseLeaseLater(k Key, token string) {
	c.flights.wg.Add(1)
	go func() {
		defer c.flights.wg.Done()
		c.releaseLease(c.base, k, token)
	}()
}

func (c *Cache[V]) releaseLease(ctx context.Context, k Key, token string) {
	_ = c.l2.call(context.WithoutCancel(ctx), func(ctx context.Context) error {
		return releaseLeaseScript.Run(ctx, c.l2.rdb, []string{c.leaseKey(k)}, token).Err()
	})
}

// awaitLease waits while another instance holds k's lease, polling Redis with a growing interval.
// found reports that the value (or a remembered not-found) appeared; mine, that the lease holds
// token, this flight's own (its SET was retried after a lost reply, so it found itself holding
// it); found and mine false with a nil error mean the lease was released or expired without a
// value, and the caller should try to take it. At giveUp the wait ends as if the lease had gone.
func (c *Cache[V]) awaitLease(ctx context.Context, k Key, seq uint64, token string, giveUp time.Time) (v V, found, mine bool, err error) {
	rkey, genKey := c.l2.readKeys(k)
	for wait := time.Millisecond; ; wait = min(wait*2, 50*time.Millisecond) {
		select {
		case <-ctx.Done():
			return v, false, false, ctx.Err()
		case <-time.After(wait):
		}
		// Only a released lease means the holder is done: until then its write may still be taken
		// back (its verify failed). So wait for the lease to go, then read the value.
		var holder *redis.StringCmd
		if err := c.l2.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
			holder = p.Get(ctx, c.leaseKey(k))
		}); err != nil {
			return v, false, false, nil // Redis is failing: let the caller load
		}
		switch h, err := holder.Result(); {
		case err == nil && h == token:
			return v, false, true, nil
		case err == nil && time.Now().Before(giveUp):
			continue
		}
		data, g, gok, err := c.readWithGen(ctx, rkey, genKey)
		if err != nil && !errors.Is(err, redis.Nil) {
			return v, false, false, nil
		}
		if err == nil {
			if e, fresh, _ := c.decodeChecked(ctx, k, rkey, data, g, gok, nil, trustNone); fresh {
				c.fillL1(k, e, seq)
				v, err := c.result(e)
				return v, true, false, err
			}
		}
		return v, false, false, nil // released without a value: the caller takes the lease
	}
}
