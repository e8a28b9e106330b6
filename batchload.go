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
	settle := func(i int32, v V, err error, usedStale bool) {
		c.flights.publish(fs[i], v, err, usedStale)
		c.flights.release(keys[i], fs[i])
	}
	// Re-check L1 inside the flights, as runFlight does: an earlier flight may have stored a key
	// between this call's read and its claim.
	todo := make([]int32, 0, len(own))
	for _, i := range own {
		if c.l1 != nil {
			if e, ok := c.l1.recheck(keys[i]); ok {
				v, err := c.result(e)
				settle(i, v, err, false)
				continue
			}
			if c.staleTTL > 0 && stale[i] == nil {
				stale[i] = c.l1.peekStale(keys[i])
			}
		}
		todo = append(todo, i)
	}
	regs := make([]registration, len(keys))
	l2ok, absent := make([]bool, len(keys)), make([]bool, len(keys))
	if c.l2 != nil && len(todo) > 0 {
		todo = c.registerBatch(ctx, keys, fs, todo, stale, so, regs, l2ok, absent, settle)
	}
	if len(todo) == 0 {
		return
	}
	c.stats.misses.Add(uint64(len(todo)))
	if c.loadTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.loadTimeout)
		defer cancel()
	}
	missing := make([]Key, len(todo))
	for j, i := range todo {
		missing[j] = keys[i]
	}
	if stop := c.softTimeoutBatch(keys, fs, todo, stale); stop != nil {
		defer stop()
	}
	c.stats.loads.Add(1)
	got, err := callLoad(ctx, &c.flights.wg, func(ctx context.Context) (map[Key]V, error) { return load(ctx, missing) })
	switch {
	case errors.Is(err, ErrNotFound):
		got = nil // none of them exists
	case err != nil:
		err = c.loadFailed(fmt.Sprintf("%d keys", len(todo)), err)
		for _, i := range todo {
			v, ferr, usedStale := c.failSafe(keys[i], stale[i], zero, err, fs[i].seq)
			settle(i, v, ferr, usedStale)
		}
		return
	}
	// Store what was loaded, and remember what was not, in both levels, as obtain does.
	ws := make([]l2write, 0, len(todo))
	for _, i := range todo {
		k := keys[i]
		v, ok := got[k]
		// delta stays 0: a batch's duration says little of what refreshing one key costs, so an
		// early refresh goes by the cache's average load cost.
		e := &l1entry[V]{val: v, tags: so.tags}
		ttl := c.l2TTL(so)
		if !ok {
			e.negative, ttl = true, c.jittered(c.negTTL)
		}
		e.expMs = time.Now().Add(ttl).UnixMilli()
		if l2ok[i] {
			data, err := c.encode(e.val, e.negative, e.expMs, regs[i].st)
			if err != nil { // the callers still get the value; it is just not cached anywhere
				c.stats.encodeErrors.Add(1)
				c.logError(ctx, "encode", k.String(), err)
				continue
			}
			ws = append(ws, l2write{k, data, c.pxTTL(ttl, e.negative), absent[i], regs[i], nil})
		}
		c.stamp(e, ttl)
		c.fillL1(k, e, fs[i].seq)
	}
	if len(ws) > 0 {
		for w, kept := range c.writeVerified(ctx, ws) {
			if !kept && c.l1 != nil {
				c.l1.remove(ws[w].k)
			}
		}
	}
	for _, i := range todo {
		if v, ok := got[keys[i]]; ok {
			settle(i, v, nil, false)
		} else {
			settle(i, zero, ErrNotFound, false)
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
// and so for the callback too).
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
			if s := stale[i]; c.inv.of(keys[i]) == fs[i].seq && s.staleUntil > now {
				c.flights.publish(fs[i], s.val, nil, true)
				served = true
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

// registerBatch registers the keys todo with their entities and tags, and reads each once more,
// in one round trip: another instance may have stored one since the batch read. It settles the
// keys it finds, records what the others' writes need (regs, l2ok, absent) and returns them.
func (c *Cache[V]) registerBatch(ctx context.Context, keys []Key, fs []*flight[V], todo []int32, stale []*l1entry[V], so setOptions,
	regs []registration, l2ok, absent []bool, settle func(int32, V, error, bool)) []int32 {
	ks, get := make([]Key, len(todo)), make([]bool, len(todo))
	for j, i := range todo {
		ks[j], get[j] = keys[i], !c.guard.skipRead()
	}
	rs, err := c.registerMany(ctx, ks, so.tags, c.maxL2TTL(so), false, get, false)
	if err != nil {
		c.countL2Error(err)
	}
	n := 0
	for j, i := range todo {
		k := ks[j]
		switch {
		case err != nil:
			c.l2.debug(ctx, "GET", c.l2.key(k), "ERROR")
		case rs[j].err != nil:
			c.countL2Error(rs[j].err)
			c.l2.debug(ctx, "GET", c.l2.key(k), "ERROR")
		case rs[j].data == nil:
			l2ok[i], absent[i], regs[i] = true, get[j], rs[j].reg
			if get[j] {
				c.l2.debug(ctx, "GET", c.l2.key(k), "MISS")
				c.guard.record(ctx, false)
			}
		default:
			l2ok[i], regs[i] = true, rs[j].reg
			rkey := c.l2.key(k)
			e, fresh, err := c.decodeChecked(ctx, k, rkey, rs[j].data, rs[j].reg.st.entityGen, true, rs[j].reg.st.tags, trustNone)
			c.guard.record(ctx, fresh)
			if fresh {
				c.l2.debug(ctx, "GET", rkey, "HIT")
				c.stats.l2Hits.Add(1)
				c.fillL1(k, e, fs[i].seq)
				v, err := c.result(e)
				settle(i, v, err, false)
				continue
			}
			if err == nil && stale[i] == nil && !e.negative {
				stale[i] = e // a stale value in Redis, kept by StaleTTL
			}
			if errors.Is(err, errL2Call) {
				l2ok[i] = false
			}
			c.l2.debug(ctx, "GET", rkey, "MISS")
		}
		todo[n] = i
		n++
	}
	return todo[:n]
}
