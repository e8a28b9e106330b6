package imgcache

import (
	"sync/atomic"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// Lazy promotion: an LRU hit marks its entry to be moved to the front only if at least a quarter
// of the list's capacity has been moved in front of it since it was last moved; an entry nearer the
// front cannot be evicted before it would be, and a hit on it writes nothing. With a few entries
// per shard the quarter is zero, and every hit moves its entry at once: the LRU is exact.
const lazyFraction = 4

// mover counts the moves to the front of one LRU list (a shard's, or W-TinyLFU's protected
// segment) for lazy promotion. Its entries' moved fields hold its count at their last move. Moves
// happen under the shard lock; hits read moves and moved without it, so both are atomic.
type mover struct {
	moves uint64 // entries moved to the front so far (adds, promotions, second chances); atomic
	lazy  uint64 // an entry fewer than this many moves from the front is not moved
}

func newMover(capacity int) mover { return mover{lazy: uint64(capacity / lazyFraction)} }

// due reports whether an entry last moved at count moved is far enough from the front to be moved
// on a hit.
func (m *mover) due(moved uint64) bool { return atomic.LoadUint64(&m.moves)-moved >= m.lazy }

// count records a move to the front and returns the count to store in the entry's moved field.
// The caller holds the shard lock.
func (m *mover) count() uint64 {
	n := m.moves + 1
	atomic.StoreUint64(&m.moves, n)
	return n
}

// lastMove returns the mover's count at e's last move to the front.
func (e *l1entry[V]) lastMove() uint64 { return atomic.LoadUint64(&e.moved) }

// movedTo records a move of e to the front of m's list: e is no longer marked. The caller holds
// the shard lock.
func (e *l1entry[V]) movedTo(m *mover) {
	atomic.StoreUint32(&e.ref, 0)
	atomic.StoreUint64(&e.moved, m.count())
}

// leftFront records that e is in no mover's list (W-TinyLFU's window or probation segment).
func (e *l1entry[V]) leftFront() {
	atomic.StoreUint32(&e.ref, 0)
	atomic.StoreUint64(&e.moved, 0)
}

// mark records a hit on a due entry and reports whether e was not marked yet. It writes only then,
// so that hits on a hot key do not keep writing its cache line. Two hits at once may both find it
// unmarked: W-TinyLFU's sketch then counts both, which is harmless.
func (e *l1entry[V]) mark() bool {
	if atomic.LoadUint32(&e.ref) != 0 {
		return false
	}
	atomic.StoreUint32(&e.ref, 1)
	return true
}

func (e *l1entry[V]) marked() bool { return atomic.LoadUint32(&e.ref) != 0 }

// secondChanceLocked moves the marked entries at the end of the LRU to its front, clearing their
// marks, so that the entry the next Add evicts is one that was not hit while due.
func (s *l1shard[V]) secondChanceLocked() { secondChance(s.lru, &s.front) }

// secondChance moves the marked entries at the end of lru to its front, counting the moves in
// front and clearing the marks, until its oldest entry is unmarked. It stops after a full turn, as
// hits may mark entries again meanwhile. The LRU shards run it before an eviction, W-TinyLFU's
// protected segment before a demotion.
func secondChance[V any](lru *simplelru.LRU[uint64, *l1entry[V]], front *mover) {
	for range lru.Len() {
		h, e, ok := lru.GetOldest()
		if !ok || !e.marked() {
			return
		}
		lru.Get(h)
		e.movedTo(front)
	}
}
