package imgcache

import (
	"context"
	"errors"
	"fmt"
)

// Batches. GetMany and GetOrLoadMany answer many keys at once: from L1, then with one Redis round
// trip for all of L1's misses, then (GetOrLoadMany) with one call of the loader for what is left.
// Per key they keep the single-key guarantees: stamps checked, L1 filled under the invalidation
// guard, loads shared with concurrent callers and verified after writing.

// batchLoader is GetOrLoadMany's load function.
type batchLoader[V any] func(ctx context.Context, missing []Key) (map[Key]V, error)

// GetMany returns the values of ks: vals[i] is ks[i]'s value when found[i]. A key is not found
// when neither level has it, when a loader's ErrNotFound is remembered for it, or when Redis fails
// (fail-open: a Redis failure counts in Stats.L2Errors and never fails GetMany).
//
// The keys L1 does not have are read from Redis in one round trip: one MGET of the values and of
// their entities' generations on a single Redis, a pipeline of GETs on a Cluster or Ring (go-redis
// sends one per node). Values stamped with tags take one more round trip for all the tags'
// generations. Each value read is checked as Get checks it and fills L1 as Get would.
//
// Keys may repeat; each position gets its answer, and each counts in Stats as a Get of it would:
// an L1 hit, an L2 hit or a miss. GetMany returns ErrClosed after Close, and an error naming the
// first invalid key (by its index in ks), in which case nothing is read.
func (c *Cache[V]) GetMany(ctx context.Context, ks []Key) (vals []V, found []bool, err error) {
	if err := c.checkMany(ks); err != nil {
		return nil, nil, err
	}
	vals, found = make([]V, len(ks)), make([]bool, len(ks))
	b := c.readBatch(ctx, ks, vals, found, nil)
	c.stats.misses.Add(uint64(len(b.left)))
	return vals, found, nil
}

// GetOrLoadMany is GetMany that loads what neither level has: vals[i] is ks[i]'s value when
// found[i]. The keys that GetMany would not find, and that no load on this Cache is already
// fetching, go to load in one call; a key with a load running (a GetOrLoad's, or another
// GetOrLoadMany's) is waited for instead, and concurrent GetOrLoad and GetOrLoadMany calls of the
// keys given to load wait for this call's load.
//
// load gets those keys (distinct, valid, in a slice of its own) and returns the values it found;
// a key it leaves out is not found, and is remembered so for Options.NegativeTTL in both levels,
// as a GetOrLoad loader's ErrNotFound would be. The map's keys are the Keys it was given (equal
// Keys are the same key); others are ignored. The loaded values are stored in both levels as
// GetOrLoad stores them: stamped, with WithTTL and WithTags applied to every key, and checked after
// writing so that a Delete, Set or invalidation that ran during the load does not leave its result
// cached. Redis round trips do not grow with the number of keys: one to read, one to register the
// keys to load with their entities and tags, and one to write and verify them.
//
// As GetOrLoad's, the load takes each key's lease in Redis (unless Options.LocalLoadsOnly), in
// the registration's round trip, so that instances missing the same keys at the same moment do not
// all load them: the keys whose leases this call takes go to load at once, and those whose leases
// another instance holds are waited for, polled together, and get that instance's values. Those it
// did not store (its load failed) go to another call of load as soon as this call has taken their
// leases, one call per poll that frees some. A wait ends after Options.LockTTL of waiting (this
// call's own loads meanwhile not counted), when Redis fails, and at Close: the keys left are then
// loaded here, or at Close fail. Options.LoadTimeout applies to each call of load, and so
// does Options.StaleTTL's fail-safe when load fails (a key with a stale value gets it).
// So does Options.SoftLoadTimeout: past it, a key with a stale value at hand gets it while the
// load goes on and stores its results when it ends; the other keys wait for the load.
//
// If load fails, its map is ignored and the keys answered otherwise are still returned, with its
// error, wrapped; the error is not cached. An error wrapping ErrNotFound is not a failure: it makes every key given to
// load not found, and remembered so. A panicking load becomes an error. If several loads fail
// (this call's and others it waited for), err is one of their errors. If ctx ends while
// GetOrLoadMany waits for loads, it returns ctx's error with the answers it has; the loads go on
// for their other callers and are cached.
//
// In Stats, each position counts once: as an L1 hit, an L2 hit, a miss (this call's load), or
// Coalesced when it waited for a load another position or call was already doing. Loads counts
// each call of load. GetOrLoadMany returns ErrClosed after Close, and an error for an invalid key
// (naming its index in ks), TTL or tag, or a nil load.
func (c *Cache[V]) GetOrLoadMany(ctx context.Context, ks []Key, load func(ctx context.Context, missing []Key) (map[Key]V, error), opts ...SetOption) (vals []V, found []bool, err error) {
	if err := c.checkMany(ks); err != nil {
		return nil, nil, err
	}
	if load == nil {
		return nil, nil, errors.New("imgcache: get or load many: nil load function")
	}
	so, err := c.setOptions(opts)
	if err != nil {
		return nil, nil, fmt.Errorf("imgcache: get or load many: %w", err)
	}
	vals, found = make([]V, len(ks)), make([]bool, len(ks))
	var refresh func(Key, *l1entry[V])
	if c.beta > 0 {
		refresh = func(k Key, e *l1entry[V]) {
			if e.refreshFrom != 0 && coarseNow() >= e.refreshFrom {
				c.maybeRefresh(ctx, k, e, loadOne(load, k), so)
			}
		}
	}
	b := c.readBatch(ctx, ks, vals, found, refresh)
	if len(b.left) == 0 {
		return vals, found, nil
	}
	keys, of, stale, readSeqs := b.unanswered()
	fs, joined, err := c.flights.claim(keys)
	if err != nil {
		return vals, found, err
	}
	// The stale values the read found are kept for the fail-safe and the soft timeout, which serve
	// one only if no invalidation of its key has run since: since the read, not only since the
	// flights' claim after it.
	for x, s := range stale {
		if s != nil && readSeqs[x] != fs[x].seq {
			stale[x] = nil // an invalidation ran between the read and the claim
		}
	}
	own := make([]int32, 0, len(keys))
	for i := range keys {
		if !joined[i] {
			own = append(own, int32(i))
		}
	}
	if len(own) > 0 {
		run := func() {
			defer c.flights.wg.Done()
			c.loadBatch(ctx, keys, fs, own, stale, load, so)
		}
		// As GetOrLoad: a caller that cannot leave early runs the load itself, unless a soft timeout
		// may hand it stale values before the load ends.
		if ctx.Done() == nil && c.softTimeout == 0 {
			run()
		} else {
			go run()
		}
	}
	// A position whose key another call is loading, or that repeats a key of this call, joined a
	// load: Coalesced. The first position of each key this call loads is counted by the load.
	counted := make([]bool, len(keys))
	var coalesced uint64
	for j := range b.left {
		x := of[j]
		if joined[x] || counted[x] {
			coalesced++
		}
		counted[x] = true
	}
	c.stats.coalesced.Add(coalesced)
	var staleServed uint64
	defer func() { c.stats.staleServed.Add(staleServed) }()
	for j, i := range b.left {
		f := fs[of[j]]
		select {
		case <-f.done:
		case <-ctx.Done():
			return vals, found, ctx.Err()
		}
		if f.stale {
			staleServed++
		}
		switch {
		case f.err == nil:
			vals[i], found[i] = f.val, true
		case errors.Is(f.err, ErrNotFound):
		case err == nil:
			err = f.err
		}
	}
	return vals, found, err
}

// loadOne adapts a batch loader to one key, for an early refresh.
func loadOne[V any](load batchLoader[V], k Key) func(context.Context) (V, error) {
	return func(ctx context.Context) (V, error) {
		m, err := load(ctx, []Key{k})
		v, ok := m[k]
		switch {
		case err != nil:
			var zero V
			return zero, err
		case !ok:
			return v, ErrNotFound
		}
		return v, nil
	}
}

// checkMany is check for every key of a batch.
func (c *Cache[V]) checkMany(ks []Key) error {
	if c.closed.Load() {
		return ErrClosed
	}
	for i, k := range ks {
		if err := c.check(k); err != nil {
			return fmt.Errorf("%w (ks[%d])", err, i)
		}
	}
	return nil
}

// batch is what readBatch left unanswered: the positions left of ks, and for each of them (left[j])
// the index of its key among the distinct keys that readBatch read from Redis (keys[of[j]]), with
// the stale value Redis had for it, if StaleTTL keeps one, and the key's invalidation sequence
// before that read (seqs, with StaleTTL only).
type batch[V any] struct {
	left  []int
	keys  []Key
	of    []int32
	stale []*l1entry[V]
	seqs  []uint64
}

// tally counts a batch's answers, to add them to the stats once.
type tally struct{ l2Hits, negative, stale uint64 }

func (t *tally) answer(negative, stale bool) bool {
	if stale {
		t.stale++
	}
	if negative {
		t.negative++
	}
	return !negative
}

// readBatch answers what it can of ks from L1 and then from Redis, in one round trip for all of
// L1's misses, filling vals and found and counting each answered position as a Get would. hit, if
// set, sees every L1 hit.
func (c *Cache[V]) readBatch(ctx context.Context, ks []Key, vals []V, found []bool, hit func(Key, *l1entry[V])) batch[V] {
	var t tally
	defer func() {
		c.stats.l2Hits.Add(t.l2Hits)
		c.stats.negativeHits.Add(t.negative)
		c.stats.staleServed.Add(t.stale)
	}()
	miss := make([]int, 0, len(ks))
	for i, k := range ks {
		if c.l1 == nil {
			miss = append(miss, i)
			continue
		}
		e, ok := c.l1.get(k)
		if !ok {
			miss = append(miss, i)
			continue
		}
		if hit != nil {
			hit(k, e)
		}
		if t.answer(e.negative, e.stale) {
			vals[i], found[i] = e.val, true
		}
	}
	if len(miss) == 0 {
		return batch[V]{}
	}
	keys, of, first := distinct(ks, miss)
	var seqs []uint64 // for a stale value's fail-safe and soft timeout: GetOrLoadMany
	if c.staleTTL > 0 {
		seqs = make([]uint64, len(keys))
		for x, k := range keys {
			seqs[x] = c.inv.of(k)
		}
	}
	// Each key's value goes to its first position, and from there to the others.
	got := make([]bool, len(keys))
	stale := c.readL2Many(ctx, keys, func(x int32, e *l1entry[V]) {
		got[x] = true
		if i := first[x]; !e.negative {
			vals[i], found[i] = e.val, true
		}
	})
	left, leftOf := miss[:0], of[:0] // compacted in place: left never overtakes miss
	for j, i := range miss {
		x := of[j]
		if !got[x] {
			left, leftOf = append(left, i), append(leftOf, x)
			continue
		}
		t.l2Hits++
		if i0 := first[x]; !found[i0] {
			t.negative++
		} else if i != int(i0) {
			vals[i], found[i] = vals[i0], true
		}
	}
	return batch[V]{left: left, keys: keys, of: leftOf, stale: stale, seqs: seqs}
}

// unanswered returns the distinct keys of the positions left, for each position its key's index
// among them, their stale values (nil where there are none), and their sequences before the read.
func (b *batch[V]) unanswered() (keys []Key, of []int32, stale []*l1entry[V], seqs []uint64) {
	idx := make([]int32, len(b.keys))
	for i := range idx {
		idx[i] = -1
	}
	of = make([]int32, len(b.left))
	for j, x := range b.of {
		if idx[x] < 0 {
			idx[x] = int32(len(keys))
			keys = append(keys, b.keys[x])
			var s *l1entry[V]
			var seq uint64
			if b.stale != nil {
				s = b.stale[x]
			}
			if b.seqs != nil {
				seq = b.seqs[x]
			}
			stale, seqs = append(stale, s), append(seqs, seq)
		}
		of[j] = idx[x]
	}
	return keys, of, stale, seqs
}

// distinct returns the distinct keys among ks[pos[j]], for each j its key's index in keys, and for
// each key the first position (an index in ks) where it appears. When those are all of ks, each
// once (a batch of distinct keys that L1 does not have), keys is ks itself.
func distinct(ks []Key, pos []int) (keys []Key, of []int32, first []int32) {
	of, first = make([]int32, len(pos)), make([]int32, 0, len(pos))
	t := newHashIndex(len(pos))
	for j, i := range pos {
		k := ks[i]
		x := t.slot(k.h, func(x int32) bool { return ks[first[x]] == k })
		if *x == 0 {
			first = append(first, int32(i))
			*x = int32(len(first))
		}
		of[j] = *x - 1
	}
	if len(first) == len(ks) { // pos is increasing: every position, in order
		return ks, of, first
	}
	keys = make([]Key, len(first))
	for x, i := range first {
		keys[x] = ks[i]
	}
	return keys, of, first
}

// hashIndex finds equal items in a batch without a map: an open-addressed table of item indices
// (plus one; 0 is an empty slot) by a 64-bit hash of the item, for up to half its size in items.
type hashIndex []int32

func newHashIndex(n int) hashIndex {
	size := 16
	for size < 2*n {
		size *= 2
	}
	return make(hashIndex, size)
}

// slot returns the slot of the item whose hash is h: it holds the item's index plus one, or 0 if
// the item is not there yet. same reports whether the item at an index is the one looked for.
func (t hashIndex) slot(h uint64, same func(int32) bool) *int32 {
	mask := uint64(len(t) - 1)
	for i := h & mask; ; i = (i + 1) & mask {
		if t[i] == 0 || same(t[i]-1) {
			return &t[i]
		}
	}
}
