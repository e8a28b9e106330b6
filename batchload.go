package imgcache

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// The load behind GetOrLoadMany: one flight per key, one body for all of them.

// loadBatch is the shared body of one GetOrLoadMany's flights: fs[i] for keys[i], for each i in
// own. stale[i] is a value past its TTL, for the fail-safe, or nil. It runs under a context that
// keeps the caller's values but not its cancellation, and that Close cancels, and it publishes and
// releases every one of its flights, whatever happens.
//
// With leases (the default with Redis), the registration takes each key's lease as GetOrLoad's
// does. The keys whose leases it holds, or that have none (LocalLoadsOnly, Redis failing), go to
// one call of load; then the keys whose leases other holders have are waited for together
// (awaitLeases), and each time some come free without a value, their leases are taken and they go
// to another call at once. So no key is loaded by two instances at once while Redis is healthy.
func (c *Cache[V]) loadBatch(callerCtx context.Context, keys []Key, fs []*flight[V], own []int32, stale []*l1entry[V], load batchLoader[V], so setOptions) {
	lctx := newLoadCtx(context.WithoutCancel(callerCtx), c.base)
	var ctx context.Context = lctx
	var zero V
	defer func() {
		lctx.end()
		for _, i := range own { // a no-op for the flights settled already
			c.flights.publish(fs[i], zero, errBatchAbandoned, false)
			c.flights.release(keys[i], fs[i])
		}
	}()
	b := &batchFlight[V]{c: c, keys: keys, fs: fs, stale: stale, load: load, so: so}
	// Re-check L1 inside the flights, as runFlight does: an earlier flight may have stored a key
	// between this call's read and its claim.
	todo := make([]int32, 0, len(own))
	for _, i := range own {
		if c.l1 != nil {
			if e, ok := c.l1.recheck(keys[i]); ok {
				v, err := c.result(e)
				b.settle(i, v, err, false)
				continue
			}
			if c.staleTTL > 0 && stale[i] == nil {
				stale[i] = c.l1.peekStale(keys[i])
			}
		}
		todo = append(todo, i)
	}
	b.regs = make([]registration, len(keys))
	b.l2ok, b.absent = make([]bool, len(keys)), make([]bool, len(keys))
	if c.l2 != nil && len(todo) > 0 {
		if c.leases {
			b.leases = make([]leaseState, len(keys))
		}
		todo = b.register(ctx, todo)
	}
	if len(todo) == 0 {
		return
	}
	c.stats.misses.Add(uint64(len(todo)))
	if stop := c.softTimeoutBatch(keys, fs, todo, stale); stop != nil {
		defer stop()
	}
	now, waiting := todo[:0:0], todo[:0:0]
	for _, i := range todo {
		if b.leases != nil && b.leases[i].busy {
			waiting = append(waiting, i)
		} else {
			now = append(now, i)
		}
	}
	b.loadAndStore(ctx, now)
	// A lease taken while waiting is loaded under at once, as obtain does: held idle while the
	// other keys are waited for, it could expire, or keep another instance waiting until it gives
	// up and loads the key too. The wait gives up LockTTL after it began, not counting the time
	// spent in those loads: meanwhile no lease is polled, and a lease another instance took in
	// that time must get its full LockTTL. (The keys still waiting get their values only once
	// such a load ends: a little latency, in exchange for loads that run in this goroutine.)
	giveUp := time.Now().Add(c.lockTTL)
	for len(waiting) > 0 {
		var next []int32
		next, waiting = b.awaitLeases(ctx, waiting, giveUp)
		start := time.Now()
		b.loadAndStore(ctx, next)
		giveUp = giveUp.Add(time.Since(start))
	}
}

// batchFlight is the state of one loadBatch: per key of keys, its flight, stale value,
// registration, whether its load's result can be written to Redis (l2ok) and only if still absent,
// and its lease (nil without leases).
type batchFlight[V any] struct {
	c      *Cache[V]
	keys   []Key
	fs     []*flight[V]
	stale  []*l1entry[V]
	load   batchLoader[V]
	so     setOptions
	regs   []registration
	l2ok   []bool
	absent []bool
	leases []leaseState
}

// settle publishes key i's answer to its callers and releases its flight.
func (b *batchFlight[V]) settle(i int32, v V, err error, usedStale bool) {
	b.c.flights.publish(b.fs[i], v, err, usedStale)
	b.c.flights.release(b.keys[i], b.fs[i])
}

// fail settles the keys idx with err, or with their stale values (the fail-safe).
func (b *batchFlight[V]) fail(idx []int32, err error) {
	var zero V
	for _, i := range idx {
		v, ferr, usedStale := b.c.failSafe(b.keys[i], b.stale[i], zero, err, b.fs[i].seq)
		b.settle(i, v, ferr, usedStale)
	}
}

// loadAndStore loads the keys idx in one call of the batch's loader, stores the results in both
// levels as obtain does, settles every one of them, and releases the leases it holds for them.
func (b *batchFlight[V]) loadAndStore(ctx context.Context, idx []int32) {
	if len(idx) == 0 {
		return
	}
	c, keys := b.c, b.keys
	held := make([]*heldLease, len(idx))
	if b.leases != nil {
		for j, i := range idx {
			if ls := b.leases[i]; ls.token != "" && !ls.busy {
				held[j] = &heldLease{token: ls.token}
			}
		}
		// Whatever happens, no lease outlives the load: those its write did not release go here.
		defer b.releaseHeld(ctx, idx, held)
	}
	if c.loadTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.loadTimeout)
		defer cancel()
	}
	if err := ctx.Err(); err != nil { // Close: no loader is called after it
		b.fail(idx, c.loadFailed(fmt.Sprintf("%d keys", len(idx)), err))
		return
	}
	missing := make([]Key, len(idx))
	for j, i := range idx {
		missing[j] = keys[i]
	}
	c.stats.loads.Add(1)
	got, err := callLoad(ctx, &c.flights.wg, func(ctx context.Context) (map[Key]V, error) { return b.load(ctx, missing) })
	switch {
	case errors.Is(err, ErrNotFound):
		got = nil // none of them exists
	case err != nil:
		b.fail(idx, c.loadFailed(fmt.Sprintf("%d keys", len(idx)), err))
		return
	}
	// Store what was loaded, and remember what was not, in both levels, as obtain does.
	ws := make([]l2write, 0, len(idx))
	for j, i := range idx {
		k := keys[i]
		v, ok := got[k]
		// delta stays 0: a batch's duration says little of what refreshing one key costs, so an
		// early refresh goes by the cache's average load cost.
		e := &l1entry[V]{val: v, tags: b.so.tags}
		ttl := c.l2TTL(b.so)
		if !ok {
			e.negative, ttl = true, c.negativeTTL()
		}
		e.expMs = time.Now().Add(ttl).UnixMilli()
		if b.l2ok[i] {
			data, err := c.encode(e.val, e.negative, e.expMs, b.regs[i].st)
			if err != nil { // the callers still get the value; it is just not cached anywhere
				c.stats.encodeErrors.Add(1)
				c.logError(ctx, "encode", k.String(), err)
				continue
			}
			ws = append(ws, l2write{k, data, c.pxTTL(ttl, e.negative), b.absent[i], b.regs[i], held[j]})
		}
		c.stamp(e, ttl)
		c.fillL1(k, e, b.fs[i].seq)
	}
	if len(ws) > 0 {
		for w, kept := range c.writeVerified(ctx, ws) {
			if !kept && c.l1 != nil {
				c.l1.remove(ws[w].k)
			}
		}
	}
	var zero V
	for _, i := range idx {
		if v, ok := got[keys[i]]; ok {
			b.settle(i, v, nil, false)
		} else {
			b.settle(i, zero, ErrNotFound, false)
		}
	}
}

var errBatchAbandoned = errors.New("imgcache: batch load ended without a result")

// softTimeoutBatch applies SoftLoadTimeout to a batch load, as runFlightFrom does to one key's:
// past it, each key todo with a stale value at hand (stale[i]) publishes that value to its callers,
// unless an invalidation has run since its flight began or the value is past StaleTTL, while the
// load goes on and stores what it loads when it finishes. Keys without a stale value wait for the
// load. The flights stay in the map until then, so no second load of a key starts meanwhile. It
// returns nil when no key has a stale value; otherwise a stop to call when the load has ended,
// which returns once the timer's callback, if it started, has finished (Close waits for the batch,
// and so for the callback too). The timer is the load's deadline, as a context's would be: one per
// batch load in flight, and only with a stale value at hand, never one per cached entry.
func (c *Cache[V]) softTimeoutBatch(keys []Key, fs []*flight[V], todo []int32, stale []*l1entry[V]) (stop func()) {
	if c.softTimeout == 0 {
		return nil
	}
	var withStale []int32
	for _, i := range todo {
		if s := stale[i]; s != nil && !s.negative {
			withStale = append(withStale, i)
		}
	}
	if len(withStale) == 0 {
		return nil
	}
	fired := make(chan struct{})
	t := time.AfterFunc(c.softTimeout, func() {
		defer close(fired)
		now, served := preciseNow(), false
		for _, i := range withStale {
			if s := stale[i]; c.inv.of(keys[i]) == fs[i].seq && s.staleUntil > now && c.flights.publish(fs[i], s.val, nil, true) {
				served = true // not for a key settled already
			}
		}
		if served { // the load goes on in the background for the callers that have their answer
			c.stats.refreshes.Add(1)
		}
	})
	return func() {
		if !t.Stop() {
			<-fired
		}
	}
}

// register registers the keys todo with their entities and tags, reads each once more, and with
// leases takes each key's lease, in one round trip: another instance may have stored a key since
// the batch read. It settles the keys it finds (releasing the leases it took for them), records
// what the others' loads need (regs, l2ok, absent, leases) and returns them.
func (b *batchFlight[V]) register(ctx context.Context, todo []int32) []int32 {
	c, keys := b.c, b.keys
	ks, get := make([]Key, len(todo)), make([]bool, len(todo))
	for j, i := range todo {
		ks[j], get[j] = keys[i], !c.guard.skipRead()
	}
	rs, err := c.registerMany(ctx, ks, b.so.tags, c.maxL2TTL(b.so), false, get, b.leases != nil)
	if err != nil {
		c.countL2Error(err)
		// Redis is failing: the keys load without leases, and those the registration may have
		// taken go after this call, without holding it up.
		var mine []Key
		var tokens []string
		for j, r := range rs {
			if r.lease != "" { // a busy one may be this call's own (a retried SET took it)
				mine, tokens = append(mine, ks[j]), append(tokens, r.lease)
			}
		}
		c.releaseLeasesLater(mine, tokens)
	}
	var hits []Key
	var hitTokens []string
	n := 0
	for j, i := range todo {
		k := ks[j]
		if err == nil && b.leases != nil {
			b.leases[i] = leaseState{token: rs[j].lease, busy: rs[j].leaseBusy}
		}
		switch {
		case err != nil:
			c.l2.debug(ctx, "GET", c.l2.key(k), "ERROR")
		case rs[j].err != nil:
			c.countL2Error(rs[j].err)
			c.l2.debug(ctx, "GET", c.l2.key(k), "ERROR")
		case rs[j].data == nil:
			b.l2ok[i], b.absent[i], b.regs[i] = true, get[j], rs[j].reg
			if get[j] {
				c.l2.debug(ctx, "GET", c.l2.key(k), "MISS")
				c.guard.record(ctx, false)
			}
		default:
			b.l2ok[i], b.regs[i] = true, rs[j].reg
			rkey := c.l2.key(k)
			e, fresh, err := c.decodeChecked(ctx, k, rkey, rs[j].data, rs[j].reg.st.entityGen, true, rs[j].reg.st.tags, trustNone)
			c.guard.record(ctx, fresh)
			if fresh {
				c.l2.debug(ctx, "GET", rkey, "HIT")
				c.stats.l2Hits.Add(1)
				c.fillL1(k, e, b.fs[i].seq)
				v, err := c.result(e)
				b.settle(i, v, err, false)
				if b.leases != nil && b.leases[i].token != "" { // a busy one may be this call's own
					hits, hitTokens = append(hits, k), append(hitTokens, b.leases[i].token)
				}
				continue
			}
			if err == nil && b.stale[i] == nil && !e.negative {
				b.stale[i] = e // a stale value in Redis, kept by StaleTTL
			}
			if errors.Is(err, errL2Call) {
				b.l2ok[i] = false
			}
			c.l2.debug(ctx, "GET", rkey, "MISS")
		}
		todo[n] = i
		n++
	}
	if len(hits) > 0 {
		c.releaseLeases(ctx, hits, hitTokens)
	}
	return todo[:n]
}
