package imgcache

import "sync/atomic"

// l1index is a shard's read index: an open-addressing table from a Key's hash to the entry that
// the shard's golang-lru holds for that hash, which a hit reads without taking the shard's lock.
// It holds exactly what golang-lru holds: writers change both in one critical section under the
// shard lock, and l1index_test.go checks that they stay in step.
//
// Slots are atomic pointers, probed linearly from other bits of the hash than the shard's. An entry
// never moves to another slot of a table: a removal leaves a tombstone, and when entries and
// tombstones fill three quarters of the slots the writer builds a new table from the entries and
// publishes it (l1shard.index). So a reader on a table that has just been replaced still finds
// every entry that was there when it started, and sees only entries that were: its read takes
// effect before the writes it missed, which overlapped it. A read that starts after a removal
// returned loads the table that removal left behind, where the entry is gone.
//
// An entry is found only by its own Key; the slot of its hash holding another key's entry (a
// collision, which golang-lru keys the same) is a miss.
type l1index[V any] struct {
	slots []atomic.Pointer[l1entry[V]] // a power of two; nil: never used; tomb: removed
	tomb  *l1entry[V]                  // the tombstone, one per l1, never an entry
	_     [64 - 32]byte                // live and used change on writes: not on the line hits read
	live  int                          // entries; under the shard lock
	used  int                          // entries and tombstones; under the shard lock
}

// minIndexSlots is the size of an empty shard's table. Tables grow with the entries, not with the
// shard's capacity, so that a large L1 that is still empty costs little.
const minIndexSlots = 8

// newL1Index returns a table with room for live entries at half load at most.
func newL1Index[V any](live int, tomb *l1entry[V]) *l1index[V] {
	n := minIndexSlots
	for n < 2*live {
		n *= 2
	}
	return &l1index[V]{slots: make([]atomic.Pointer[l1entry[V]], n), tomb: tomb}
}

// start is the first slot probed for hash h: the shard took the low bits.
func (t *l1index[V]) start(h uint64) uint64 { return h >> 32 & uint64(len(t.slots)-1) }

// find returns k's entry, or nil. It takes no lock.
func (t *l1index[V]) find(k Key) *l1entry[V] {
	mask := uint64(len(t.slots) - 1)
	for i := t.start(k.h); ; i = (i + 1) & mask {
		e := t.slots[i].Load()
		switch {
		case e == nil:
			return nil
		case e.key == k:
			return e
		case e.key.h == k.h && e != t.tomb:
			return nil // the slot of k's hash holds another key's entry
		}
	}
}

// put stores e as the entry of hash h, in place of the entry of h if there is one. The caller holds
// the shard lock and rebuilds the table when full reports true.
func (t *l1index[V]) put(h uint64, e *l1entry[V]) {
	mask := uint64(len(t.slots) - 1)
	free := -1
	for i := t.start(h); ; i = (i + 1) & mask {
		c := t.slots[i].Load()
		switch {
		case c == nil: // h is absent: take the first tombstone passed, or this slot
			if free < 0 {
				free = int(i)
				t.used++
			}
			t.slots[free].Store(e)
			t.live++
			return
		case c == t.tomb:
			if free < 0 {
				free = int(i)
			}
		case c.key.h == h:
			t.slots[i].Store(e)
			return
		}
	}
}

// remove replaces the entry of hash h with a tombstone and reports whether there was one. The
// caller holds the shard lock.
func (t *l1index[V]) remove(h uint64) bool {
	mask := uint64(len(t.slots) - 1)
	for i := t.start(h); ; i = (i + 1) & mask {
		c := t.slots[i].Load()
		switch {
		case c == nil:
			return false
		case c != t.tomb && c.key.h == h:
			t.slots[i].Store(t.tomb)
			t.live--
			return true
		}
	}
}

// full reports whether entries and tombstones fill three quarters of the slots: past that, probes
// grow long, and a probe must always end at an empty slot.
func (t *l1index[V]) full() bool { return t.used > len(t.slots)/4*3 }

// rebuilt returns a new table with t's entries and no tombstones, at most half full.
func (t *l1index[V]) rebuilt() *l1index[V] {
	nt := newL1Index(t.live, t.tomb)
	for i := range t.slots {
		if e := t.slots[i].Load(); e != nil && e != t.tomb {
			nt.put(e.key.h, e)
		}
	}
	return nt
}

// each calls f for every entry of t; the caller holds the shard lock.
func (t *l1index[V]) each(f func(*l1entry[V])) {
	for i := range t.slots {
		if e := t.slots[i].Load(); e != nil && e != t.tomb {
			f(e)
		}
	}
}
