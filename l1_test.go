package imgcache

import (
	"fmt"
	"sync"
	"testing"
)

func testEntry(v int) *l1entry[int] {
	return &l1entry[int]{val: v, exp: 1 << 62, staleUntil: 1 << 62}
}

// Two keys whose hashes collide take turns in one slot; neither ever reads the other's value, and
// removing one leaves the other.
func TestL1HashCollisionNeverServesAnotherKey(t *testing.T) {
	for _, policy := range []Policy{PolicyLRU, PolicyTinyLFU} {
		t.Run(fmt.Sprint(policy), func(t *testing.T) {
			l := newL1[int](100, policy)
			a := NewKey("artist", "1")
			b := NewKey("artist", "2")
			b.h = a.h // a collision, forced
			l.add(a, testEntry(1))
			if _, ok := l.get(b); ok {
				t.Fatal("b read a's entry")
			}
			l.add(b, testEntry(2))
			if e, ok := l.get(b); !ok || e.val != 2 {
				t.Fatalf("get(b) = %v, %v; want 2", e, ok)
			}
			if _, ok := l.get(a); ok {
				t.Fatal("a read b's entry")
			}
			l.remove(a) // not a's slot any more: b stays
			if e, ok := l.get(b); !ok || e.val != 2 {
				t.Fatalf("after remove(a), get(b) = %v, %v; want 2", e, ok)
			}
		})
	}
}

// Keys whose parameter repeats their entity and id (NewKey("page", i).With("page", i)) each keep
// their own entry in an L1 with room for them all.
func TestL1KeepsKeysThatRepeatTheirHead(t *testing.T) {
	for _, policy := range []Policy{PolicyLRU, PolicyTinyLFU} {
		t.Run(fmt.Sprint(policy), func(t *testing.T) {
			l := newL1[int](1000, policy)
			k := func(i int) Key { return NewKey("page", fmt.Sprint(i)).With("page", fmt.Sprint(i)) }
			for i := range 10 {
				l.add(k(i), testEntry(i))
			}
			for i := range 10 {
				if e, ok := l.get(k(i)); !ok || e.val != i {
					t.Errorf("get(%#v) = %v, %v; want %d", k(i), e, ok, i)
				}
			}
		})
	}
}

// Hits order eviction: the least recently used entry goes first, however many hits came before.
func TestL1HitsOrderEviction(t *testing.T) {
	for _, hits := range []int{1, 15, 16, 53} {
		l := newL1[int](3, PolicyLRU)
		k := func(i int) Key { return NewKey("k", fmt.Sprint(i)) }
		for i := range 3 {
			l.add(k(i), testEntry(i))
		}
		// k0 is the oldest; hit it last so that k1 becomes the oldest.
		for i := range hits {
			if _, ok := l.get(k(1 + i%2)); !ok {
				t.Fatal("miss")
			}
		}
		if _, ok := l.get(k(0)); !ok {
			t.Fatal("miss")
		}
		l.add(k(3), testEntry(3))
		oldest := 1
		if hits%2 == 1 { // the last of the others' hits went to k1: k2 is the oldest
			oldest = 2
		}
		for i := range 4 {
			_, ok := l.get(k(i))
			if want := i != oldest; ok != want {
				t.Errorf("%d hits: k%d present = %v, want %v", hits, i, ok, want)
			}
		}
	}
}

// Concurrent hits, writes, removals and scans keep the shards consistent and count every hit.
func TestL1ConcurrentUse(t *testing.T) {
	for _, policy := range []Policy{PolicyLRU, PolicyTinyLFU} {
		l := newL1[int](2000, policy)
		keys := make([]Key, 500)
		for i := range keys {
			keys[i] = NewKey("artist", fmt.Sprint(i))
			l.add(keys[i], testEntry(i))
		}
		var wg sync.WaitGroup
		var hits [4]int
		for g := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 20_000 {
					k := keys[(i*7+g*131)%len(keys)]
					switch {
					case g == 3 && i%50 == 0:
						l.remove(k)
					case g == 3 && i%1000 == 0:
						l.removeIf(func(k Key, _ *l1entry[int]) bool { return k.ID() == "7" })
					case g == 3:
						l.add(k, testEntry(i))
					default:
						if e, ok := l.get(k); ok {
							if e.key != k {
								t.Errorf("get(%v) returned the entry of %v", k, e.key)
								return
							}
							hits[g]++
						}
					}
				}
			}()
		}
		wg.Wait()
		got, _, entries := l.counts()
		if want := uint64(hits[0] + hits[1] + hits[2]); got != want {
			t.Errorf("%v: counted %d hits, want %d", policy, got, want)
		}
		if entries > 500 {
			t.Errorf("%v: %d entries, want at most 500", policy, entries)
		}
	}
}

// PolicyAuto is W-TinyLFU for a large L1 and LRU for a small one.
func TestL1PolicyAuto(t *testing.T) {
	if l := newL1[int](autoTinyLFU, PolicyAuto); l.shards[0].w == nil {
		t.Errorf("an L1 of %d entries does not use W-TinyLFU", autoTinyLFU)
	}
	if l := newL1[int](autoTinyLFU-1, PolicyAuto); l.shards[0].lru == nil {
		t.Errorf("an L1 of %d entries does not use LRU", autoTinyLFU-1)
	}
}

// A recheck (a flight looking again) returns the entry and counts the hit, like get.
func TestL1RecheckReturnsTheEntry(t *testing.T) {
	for _, policy := range []Policy{PolicyLRU, PolicyTinyLFU} {
		l := newL1[int](100, policy)
		k := NewKey("artist", "1")
		l.add(k, testEntry(1))
		for range 32 {
			if e, ok := l.recheck(k); !ok || e == nil || e.val != 1 {
				t.Fatalf("%v: recheck = %v, %v; want the entry", policy, e, ok)
			}
		}
		if hits, _, _ := l.counts(); hits != 32 {
			t.Errorf("%v: %d hits counted, want 32", policy, hits)
		}
	}
}
