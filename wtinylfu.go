package imgcache

import "github.com/hashicorp/golang-lru/v2/simplelru"

// wtinylfu is W-TinyLFU (Einziger, Friedman and Manes, 2017; Caffeine's policy) built from three
// golang-lru LRUs: every new entry enters a small window (1%); the window's oldest entry then
// competes with the oldest entry of the main area's probation segment, and the TinyLFU sketch
// keeps whichever has been asked for more often; a probation entry that is hit again moves to the
// protected segment (80% of the main area), whose overflow falls back to probation. The window
// keeps bursts of new keys, the sketch keeps one-off keys and scans from pushing out popular ones.
// Entries are keyed by their Key's hash, as in the L1 shards (which check the key itself). Not safe
// for concurrent use: each L1 shard owns one, under its lock; the shard's lock-free hits read only
// its mover (front, which the shard holds) and the entries' moved and ref fields, which change
// atomically.
type wtinylfu[V any] struct {
	window, probation, protected *simplelru.LRU[uint64, *l1entry[V]]
	windowCap, mainCap, protCap  int
	freq                         *sketch
	front                        *mover // lazy promotion in the protected segment: see l1lazy.go
}

// newWTinyLFU returns a W-TinyLFU of size entries that counts its protected segment's moves in
// front.
func newWTinyLFU[V any](size int, front *mover) *wtinylfu[V] {
	w := &wtinylfu[V]{freq: newSketch(size), front: front}
	w.windowCap = max(size/100, 1)
	w.mainCap = max(size-w.windowCap, 0) // 0 for a W-TinyLFU of one entry: the window alone
	w.protCap = w.mainCap * 8 / 10
	*w.front = newMover(w.protCap)
	// The LRUs never evict by themselves: their capacities are past what the policy lets them hold.
	w.window, _ = simplelru.NewLRU[uint64, *l1entry[V]](w.windowCap+1, nil)
	w.probation, _ = simplelru.NewLRU[uint64, *l1entry[V]](w.mainCap+1, nil)
	w.protected, _ = simplelru.NewLRU[uint64, *l1entry[V]](w.protCap+1, nil)
	return w
}

// get counts an access to the key with hash k in the sketch and returns its entry, promoting a
// probation hit. A hit in the protected segment counts only when the entry is due (see mover) and
// not yet marked: once between two of its moves to the front, and the lock-free hits in
// l1shard.hit count the same way. Counting is most of a hit's cost (the sketch is too large for
// the core's cache) and needs the shard lock; a key that is protected has already shown its
// frequency, and its counters saturate at 15 anyway. Measured on the traces of
// TestL1PolicyHitRatio, before the doorkeeper: 86.96% against 86.87% counting every hit (Zipf),
// 56.89% against 56.63% (scans); counting one protected hit in 8 at random, as get did before hits
// went lock-free, kept 86.96% and 56.86%.
//
// A due protected entry is marked rather than moved: demote moves a marked entry to the front
// instead of demoting it. In a segment too small for lazy promotion, it moves at once.
func (w *wtinylfu[V]) get(k uint64) (*l1entry[V], bool) {
	if e, ok := w.protected.Peek(k); ok { // most entries, and most hits
		if !w.front.due(e.lastMove()) { // lazy promotion, as in the LRU shards (l1lazy.go)
			return e, true
		}
		if w.front.lazy == 0 {
			w.protected.Get(k)
			e.movedTo(w.front)
			w.freq.increment(k)
		} else if e.mark() {
			w.freq.increment(k)
		}
		return e, true
	}
	w.freq.increment(k)
	if e, ok := w.window.Get(k); ok {
		return e, true
	}
	if e, ok := w.probation.Peek(k); ok {
		w.probation.Remove(k)
		w.protected.Add(k, e)
		e.movedTo(w.front)
		if w.protected.Len() > w.protCap {
			w.demote()
		}
		return e, true
	}
	return nil, false
}

// demote moves the protected segment's oldest entry to probation; a marked entry (hit while due,
// see l1) moves to the front of protected instead, and the next oldest is considered, for one turn
// of the segment at most.
func (w *wtinylfu[V]) demote() {
	secondChance(w.protected, w.front)
	if k, e, ok := w.protected.RemoveOldest(); ok {
		e.leftFront()
		w.probation.Add(k, e)
	}
}

// peek looks in the segments largest first: protected holds most entries, and most hits.
func (w *wtinylfu[V]) peek(k uint64) (*l1entry[V], bool) {
	for _, l := range [...]*simplelru.LRU[uint64, *l1entry[V]]{w.protected, w.probation, w.window} {
		if e, ok := l.Peek(k); ok {
			return e, true
		}
	}
	return nil, false
}

// add stores e for the hash k and returns the hash of the entry it evicted, if it did. A hash
// already present is updated in its segment; a new one enters the window.
func (w *wtinylfu[V]) add(k uint64, e *l1entry[V]) (evicted uint64, ok bool) {
	for _, l := range [...]*simplelru.LRU[uint64, *l1entry[V]]{w.window, w.protected, w.probation} {
		if l.Contains(k) {
			l.Add(k, e) // to the front of its segment
			if l == w.protected {
				e.movedTo(w.front)
			} else {
				e.leftFront()
			}
			return 0, false
		}
	}
	e.leftFront()
	w.window.Add(k, e)
	if w.window.Len() <= w.windowCap {
		return 0, false
	}
	ck, ce, _ := w.window.RemoveOldest()
	if w.mainCap == 0 { // no main area: the window's oldest has nowhere to go
		return ck, true
	}
	if w.probation.Len()+w.protected.Len() < w.mainCap {
		w.probation.Add(ck, ce)
		return 0, false
	}
	victims := w.probation
	if victims.Len() == 0 {
		victims = w.protected
	}
	vk, _, _ := victims.GetOldest()
	// A key's first request for admission since the last halving is turned away (the doorkeeper):
	// keys seen once, as in a scan, then never replace an entry.
	if w.freq.admit(ck) && w.freq.estimate(ck) > w.freq.estimate(vk) {
		victims.Remove(vk)
		w.probation.Add(ck, ce)
		return vk, true
	}
	return ck, true
}

func (w *wtinylfu[V]) remove(k uint64) bool {
	return w.window.Remove(k) || w.protected.Remove(k) || w.probation.Remove(k)
}

func (w *wtinylfu[V]) purge() {
	w.window.Purge()
	w.probation.Purge()
	w.protected.Purge()
}

func (w *wtinylfu[V]) keys() []uint64 {
	return append(append(w.window.Keys(), w.probation.Keys()...), w.protected.Keys()...)
}

func (w *wtinylfu[V]) len() int { return w.window.Len() + w.probation.Len() + w.protected.Len() }
