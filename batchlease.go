package imgcache

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// The leases of GetOrLoadMany's loads: taken by the registration as GetOrLoad's are, waited for
// together, and released in one pipeline.

// releaseLeases releases the leases of ks, each only if it still holds its token (tokens[i]), in
// one pipeline.
func (c *Cache[V]) releaseLeases(ctx context.Context, ks []Key, tokens []string) {
	_ = c.l2.call(context.WithoutCancel(ctx), func(ctx context.Context) error {
		var scripts scriptCalls
		cmds, err := c.l2.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, k := range ks {
				scripts.run(ctx, p, releaseLeaseScript, []string{c.leaseKey(k)}, tokens[i])
			}
			return nil
		})
		scripts.retry(ctx, c.l2)
		return firstFailure(err, cmds...)
	})
}

// releaseLeasesLater releases the leases of ks that may hold tokens[i] (each is deleted only if it
// does), in a goroutine that Close waits for: one for all of them. A batch load calls it, and holds
// the flight group open meanwhile, so the Add cannot race Close's Wait.
func (c *Cache[V]) releaseLeasesLater(ks []Key, tokens []string) {
	if len(ks) == 0 {
		return
	}
	c.flights.wg.Add(1)
	go func() {
		defer c.flights.wg.Done()
		c.releaseLeases(c.base, ks, tokens)
	}()
}

// abandon lets go of the leases of the keys idx that this batch may hold but will not load under:
// a lease reported busy may be its own (go-redis retried the SET after a lost reply), and one
// whose SET got no reply may have been taken. They are released later, each only if it holds
// this batch's token, and forgotten here.
func (b *batchFlight[V]) abandon(idx []int32) {
	var ks []Key
	var tokens []string
	for _, i := range idx {
		if t := b.leases[i].token; t != "" {
			ks, tokens = append(ks, b.keys[i]), append(tokens, t)
		}
		b.leases[i] = leaseState{}
	}
	b.c.releaseLeasesLater(ks, tokens)
}

// releaseHeld releases the leases held[j] of the keys idx[j] that their writes did not release.
func (b *batchFlight[V]) releaseHeld(ctx context.Context, idx []int32, held []*heldLease) {
	var ks []Key
	var tokens []string
	for j, h := range held {
		if h != nil && !h.released {
			ks, tokens = append(ks, b.keys[idx[j]]), append(tokens, h.token)
		}
	}
	if len(ks) > 0 {
		b.c.releaseLeases(ctx, ks, tokens)
	}
}

// awaitLeases waits, as awaitLease does for one key, for the leases of the keys waiting, which
// other holders have, polling them all in one round trip with a growing interval. A key whose
// holder stored its value gets it (filling L1); a key whose lease went without a value has its
// lease taken here if it can (or waits again for the new holder's). It returns as soon as there
// are keys to load here (load), with the keys still waiting (still): those whose leases it now
// holds (leases[i] then says so), and those it stopped waiting for, with no lease: when Redis
// fails, and from giveUp (LockTTL after the wait began, whatever Redis says, as awaitLease). If
// ctx ends (Close), the keys still waiting fail with its error.
func (b *batchFlight[V]) awaitLeases(ctx context.Context, waiting []int32, giveUp time.Time) (load, still []int32) {
	c, keys := b.c, b.keys
	// closed fails every key not settled yet when ctx has ended (Close): no load starts after it.
	closed := func(idx []int32) bool {
		err := ctx.Err()
		if err == nil {
			return false
		}
		b.abandon(idx)
		b.fail(idx, c.loadFailed(fmt.Sprintf("%d keys", len(idx)), err))
		return true
	}
	noLease := func(idx []int32) { // Redis is failing: load them here
		b.abandon(idx)
		load = append(load, idx...)
	}
	for wait := time.Millisecond; len(waiting) > 0 && len(load) == 0; wait = min(wait*2, 50*time.Millisecond) {
		select {
		case <-ctx.Done():
			closed(waiting)
			return nil, nil
		case <-time.After(wait):
		}
		// Only a released lease means its holder is done (its write may still be taken back until
		// then): one round trip reads every lease, and one more the values and generations of the
		// keys whose leases have gone.
		// A failed pipeline may have failed on one node only (a Cluster's): each key's own reply
		// decides, below. Only a poll that was never sent gives up on every key.
		var holders []*redis.StringCmd
		_ = c.l2.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
			holders = make([]*redis.StringCmd, len(waiting))
			for j, i := range waiting {
				holders[j] = p.Get(ctx, c.leaseKey(keys[i]))
			}
		})
		if holders == nil {
			if closed(waiting) {
				return nil, nil
			}
			noLease(waiting)
			return load, nil
		}
		past := !time.Now().Before(giveUp)
		var gone, failed []int32
		still = make([]int32, 0, len(waiting))
		for j, i := range waiting {
			switch h, err := holders[j].Result(); {
			case err == nil && h == b.leases[i].token: // this very token (a retried SET took it)
				b.leases[i].busy = false
				load = append(load, i)
			case err == nil && !past:
				still = append(still, i)
			case err == nil || errors.Is(err, redis.Nil):
				gone = append(gone, i)
			default: // this key's read failed (its Cluster node is down)
				failed = append(failed, i)
			}
		}
		if len(failed) > 0 {
			noLease(failed) // their leases let go in one round trip, as when the whole poll fails
		}
		retake := b.readReleased(ctx, gone)
		switch {
		case past:
			noLease(retake)
		case len(retake) > 0:
			busy, mine := b.acquire(ctx, retake)
			still = append(still, busy...)
			load = append(load, mine...)
		}
		if closed(append(still, load...)) { // the replies came after Close: load nothing
			return nil, nil
		}
		waiting = still
	}
	return load, waiting
}

// readReleased reads, in one round trip, the values of the keys idx whose leases have gone, and
// settles those whose holders stored a fresh value. It returns the others.
func (b *batchFlight[V]) readReleased(ctx context.Context, idx []int32) (rest []int32) {
	if len(idx) == 0 {
		return nil
	}
	c, keys, tags := b.c, b.keys, b.so.tags
	rkeys := make([]string, len(idx))
	vals, gens := make([]*redis.StringCmd, len(idx)), make([]*redis.StringCmd, len(idx))
	// The batch's tags' current generations go in the same round trip: every value it waits for
	// carries them, and each value's check would otherwise read them again.
	tagCmds := make([]*redis.StringCmd, len(tags))
	sent := false
	err := c.l2.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
		sent = true
		for j, i := range idx {
			var genKey string
			rkeys[j], genKey = c.l2.readKeys(keys[i])
			vals[j], gens[j] = p.Get(ctx, rkeys[j]), p.Get(ctx, genKey)
		}
		for t, tag := range tags {
			tagCmds[t] = p.HGet(ctx, c.l2.tagMeta(tag), "g")
		}
	})
	if !sent {
		return idx // the caller takes the leases, or loads without them if Redis keeps failing
	}
	if err != nil {
		c.countL2Error(err) // the keys whose reads failed (on a Cluster, one node's) are left below
	}
	var known []tagGen
	for t, cmd := range tagCmds {
		if g, ok, err := genReply(cmd); err == nil && ok {
			known = append(known, tagGen{tags[t], g})
		} // a tag left out is read by the check of each value that carries it
	}
	for j, i := range idx {
		data, err := vals[j].Bytes()
		// A generation that could not be read leaves the value unchecked: not stale, not served.
		if gerr := gens[j].Err(); err == nil && (gerr == nil || errors.Is(gerr, redis.Nil)) {
			g, gerr := gens[j].Uint64()
			if e, fresh, _ := c.decodeChecked(ctx, keys[i], rkeys[j], data, g, gerr == nil, known, trustNone); fresh {
				c.fillL1(keys[i], e, b.fs[i].seq)
				v, err := c.result(e)
				c.stats.lockWaits.Add(1)
				b.settle(i, v, err, false)
				continue
			}
		}
		rest = append(rest, i) // released without a value, or one this wait cannot use
	}
	return rest
}

// acquire tries to take the leases of the keys idx, in one round trip. It returns the keys whose
// leases another holder took first (busy: wait again) and the others, to load here: with the lease
// taken, or, when the SET got no reply, possibly taken (the release then deletes it if it is).
func (b *batchFlight[V]) acquire(ctx context.Context, idx []int32) (busy, mine []int32) {
	c := b.c
	sets := make([]*redis.StatusCmd, len(idx))
	token := newLeaseToken() // one for all: this call holds them
	_ = c.l2.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
		for j, i := range idx {
			b.leases[i] = leaseState{token: token}
			sets[j] = redis.NewStatusCmd(ctx, "set", c.leaseKey(b.keys[i]), b.leases[i].token, "px", c.lockTTL.Milliseconds(), "nx")
			_ = p.Process(ctx, sets[j])
		}
	})
	for j, i := range idx {
		if sets[j] != nil && errors.Is(sets[j].Err(), redis.Nil) {
			b.leases[i].busy = true
			busy = append(busy, i)
			continue
		}
		if sets[j] == nil { // not sent (the breaker is open): no lease to release
			b.leases[i] = leaseState{}
		}
		mine = append(mine, i)
	}
	return busy, mine
}
