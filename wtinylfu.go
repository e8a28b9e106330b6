package imgcache

import "github.com/hashicorp/golang-lru/v2/simplelru"

// wtinylfu is W-TinyLFU (Einziger, Friedman and Manes, 2017; Caffeine's policy) built from three
// golang-lru LRUs: every new entry enters a small window (1%); the window's oldest entry then
// competes with the oldest entry of the main area's probation segment, and the TinyLFU sketch
// keeps whichever has been asked for more often; a probation entry that is hit again moves to the
// protected segment (80% of the main area), whose overflow falls back to probation. The window
// keeps bursts of new keys, the sketch keeps one-off keys and scans from pushing out popular ones.
// Entries are keyed by their Key's hash, as in the L1 shards (which check the key itself). Not safe
// for concurrent use: each L1 shard owns one, under its lock.
type wtinylfu[V any] struct {
	window, probation, protected *simplelru.LRU[uint64, *l1entry[V]]
	windowCap, mainCap, protCap  int
	freq                         *sketch
	rng                          uint64   // for the sampling of protected hits in get
	front                        mover    // lazy promotion in the protected segment: see l1.go
	_                            [48]byte // 128 bytes: no two shards' counters share a cache line
}

func newWTinyLFU[V any](size int) *wtinylfu[V] {
	w := &wtinylfu[V]{freq: newSketch(size)}
	w.windowCap = max(size/100, 1)
	w.mainCap = max(size-w.windowCap, 1)
	w.protCap = w.mainCap * 8 / 10
	w.front = newMover(w.protCap)
	// The LRUs never evict by themselves: their capacities are past what the policy lets them hold.
	w.window, _ = simplelru.NewLRU[uint64, *l1entry[V]](w.windowCap+1, nil)
	w.probation, _ = simplelru.NewLRU[uint64, *l1entry[V]](w.mainCap+1, nil)
	w.protected, _ = simplelru.NewLRU[uint64, *l1entry[V]](w.protCap+1, nil)
	return w
}

// get counts an access to the key with hash k in the sketch and returns its entry, promoting a
// probation hit. A hit in the protected segment counts one time in 8, at random: counting is
// most of a hit's cost (the sketch is too large for the core's cache), a key that is protected has
// already shown its frequency, and its counters saturate at 15 anyway. Measured on the traces of
// TestL1PolicyHitRatio: 86.96% against 86.87% counting every hit (Zipf), 56.86% against 56.63%
// (scans), and a hit at golang-lru's cost instead of 1.37 times it.
func (w *wtinylfu[V]) get(k uint64) (*l1entry[V], bool) {
	if e, ok := w.protected.Peek(k); ok { // most entries, and most hits
		if w.front.due(e.moved) { // lazy promotion, as in the LRU shards (l1.go)
			w.protected.Get(k)
			e.moved = w.front.count()
		}
		// A pseudo-random sample (a per-shard LCG, deterministic), so that no periodic pattern of
		// keys can leave one key's hits never counted.
		if w.rng = w.rng*6364136223846793005 + 1442695040888963407; w.rng>>61 == 0 {
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
		e.moved = w.front.count()
		if w.protected.Len() > w.protCap {
			if ok2, v, ok3 := w.protected.RemoveOldest(); ok3 {
				w.probation.Add(ok2, v)
			}
		}
		return e, true
	}
	return nil, false
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

// add stores e for the hash k and reports how many entries it evicted. A hash already present is
// updated in its segment; a new one enters the window.
func (w *wtinylfu[V]) add(k uint64, e *l1entry[V]) (evicted int) {
	for _, l := range [...]*simplelru.LRU[uint64, *l1entry[V]]{w.window, w.protected, w.probation} {
		if l.Contains(k) {
			l.Add(k, e) // to the front of its segment
			if l == w.protected {
				e.moved = w.front.count()
			}
			return 0
		}
	}
	w.window.Add(k, e)
	if w.window.Len() <= w.windowCap {
		return 0
	}
	ck, ce, _ := w.window.RemoveOldest()
	if w.probation.Len()+w.protected.Len() < w.mainCap {
		w.probation.Add(ck, ce)
		return 0
	}
	victims := w.probation
	if victims.Len() == 0 {
		victims = w.protected
	}
	vk, _, _ := victims.GetOldest()
	if w.freq.estimate(ck) > w.freq.estimate(vk) {
		victims.Remove(vk)
		w.probation.Add(ck, ce)
	}
	return 1 // the candidate or the victim
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
