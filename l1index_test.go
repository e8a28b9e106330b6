package imgcache

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"
)

// checkInStep fails unless every shard's index holds exactly the entries its policy holds, each
// found by the lock-free lookup under its own key, and none of the other keys in universe is found.
func checkInStep(t *testing.T, l *l1[int], universe []Key) {
	t.Helper()
	held := map[Key]bool{}
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		hashes := s.hashesLocked()
		policy := map[uint64]*l1entry[int]{}
		for _, h := range hashes {
			e, _ := s.peekHash(h)
			policy[h] = e
		}
		tbl := s.index.Load()
		index := map[uint64]*l1entry[int]{}
		tbl.each(func(e *l1entry[int]) {
			if _, dup := index[e.key.h]; dup {
				t.Errorf("shard %d: hash %x twice in the index", i, e.key.h)
			}
			index[e.key.h] = e
		})
		live, used, slots := tbl.live, tbl.used, len(tbl.slots)
		s.mu.Unlock()

		if len(policy) != len(index) || live != len(index) {
			t.Fatalf("shard %d: the policy holds %d entries, the index %d (live count %d)", i, len(policy), len(index), live)
		}
		if used > slots*3/4 || used < live {
			t.Errorf("shard %d: %d slots used of %d, %d live", i, used, slots, live)
		}
		for h, e := range policy {
			if index[h] != e {
				t.Fatalf("shard %d: hash %x holds %p in the policy, %p in the index", i, h, e, index[h])
			}
			if got := tbl.find(e.key); got != e {
				t.Fatalf("shard %d: find(%v) = %p, want %p", i, e.key, got, e)
			}
			held[e.key] = true
		}
	}
	for _, k := range universe {
		if !held[k] && l.shard(k).index.Load().find(k) != nil {
			t.Fatalf("find(%v) found an entry the policy does not hold", k)
		}
	}
}

// The index and golang-lru hold the same entries through every kind of write, for both policies,
// for a shard small enough to be exact and for several shards: a random sequence of adds (new keys,
// updates, keys whose hashes collide), hits, rechecks, expiries, removals of every kind and purges,
// with the tables rebuilt many times on the way.
func TestL1IndexInStepWithPolicy(t *testing.T) {
	for _, policy := range []Policy{PolicyLRU, PolicyTinyLFU} {
		for _, size := range []int{3, 100, 1000} {
			t.Run(fmt.Sprintf("%v/%d", policy, size), func(t *testing.T) {
				l := newL1[int](size, policy)
				keys := make([]Key, 3*size+10)
				for i := range keys {
					keys[i] = NewKey("k", strconv.Itoa(i))
				}
				for i := 1; i < len(keys); i += 7 { // every seventh key collides with the one before
					keys[i].h = keys[i-1].h
				}
				rng := rand.New(rand.NewPCG(1, uint64(size)))
				tables := map[*l1index[int]]bool{}
				for op := range 20_000 {
					k := keys[rng.IntN(len(keys))]
					switch r := rng.IntN(100); {
					case r < 40:
						e := testEntry(op)
						if r < 3 { // expired, and past any grace: the next get removes it
							e.exp, e.staleUntil = 0, 0
						}
						e.wid = uint64(op % 3)
						l.add(k, e)
					case r < 75:
						if e, ok := l.get(k); ok && e.key != k {
							t.Fatalf("get(%v) returned the entry of %v", k, e.key)
						}
					case r < 80:
						l.recheck(k)
					case r < 90:
						l.remove(k)
					case r < 95:
						l.removeUnless(k, uint64(op%3))
					case r < 99:
						id := k.ID()
						l.removeIf(func(k Key, _ *l1entry[int]) bool { return k.ID() == id })
					default:
						if rng.IntN(10) == 0 {
							l.purge()
						}
					}
					for i := range l.shards {
						tables[l.shards[i].index.Load()] = true
					}
					if op%97 == 0 {
						checkInStep(t, l, keys)
					}
				}
				checkInStep(t, l, keys)
				if len(tables) < 2*len(l.shards) {
					t.Errorf("%d tables for %d shards: the test did not rebuild them", len(tables), len(l.shards))
				}
			})
		}
	}
}

// Evictions keep the index in step on their own: filling an L1 far past its size leaves exactly the
// entries the policy kept, and counts every eviction.
func TestL1IndexFollowsEvictions(t *testing.T) {
	for _, policy := range []Policy{PolicyLRU, PolicyTinyLFU} {
		t.Run(fmt.Sprint(policy), func(t *testing.T) {
			l := newL1[int](500, policy)
			keys := make([]Key, 5000)
			for i := range keys {
				keys[i] = NewKey("k", strconv.Itoa(i))
				l.add(keys[i], testEntry(i))
				if i%3 == 0 { // hits, so that W-TinyLFU has some entries to protect
					l.get(keys[i/2])
				}
			}
			checkInStep(t, l, keys)
			_, evictions, entries := l.counts()
			if entries > 500+uint64(len(l.shards)) || evictions == 0 || evictions+entries != 5000 {
				t.Errorf("%d entries and %d evictions after 5000 adds to an L1 of 500", entries, evictions)
			}
		})
	}
}

// A removal that has returned is never followed by a hit on what it removed: readers that start
// after it see the table it left, whatever adds, evictions and rebuilds come next.
func TestL1NoHitAfterRemove(t *testing.T) {
	for _, policy := range []Policy{PolicyLRU, PolicyTinyLFU} {
		t.Run(fmt.Sprint(policy), func(t *testing.T) {
			l := newL1[int](300, policy)
			const n = 20_000
			keys := make([]Key, n)
			for i := range keys {
				keys[i] = NewKey("gone", strconv.Itoa(i))
			}
			var removed atomic.Int64 // keys[:removed] have been removed, and are never added again
			removed.Store(-1)
			stop := make(chan struct{})
			var wg sync.WaitGroup
			for g := range 2 {
				wg.Go(func() {
					rng := rand.New(rand.NewPCG(uint64(g), 2))
					for {
						select {
						case <-stop:
							return
						default:
						}
						r := int(removed.Load())
						if r < 0 {
							continue
						}
						for _, i := range []int{r, rng.IntN(r + 1)} {
							if e, ok := l.get(keys[i]); ok {
								t.Errorf("key %d hit after its removal returned (entry of %v)", i, e.key)
								return
							}
						}
					}
				})
			}
			for i := range keys {
				l.add(keys[i], testEntry(i))
				for j := range 3 { // other keys: evictions and rebuilds
					l.add(NewKey("other", strconv.Itoa((i*3+j)%1000)), testEntry(j))
				}
				if e, ok := l.get(keys[i]); !ok || e.val != i {
					if policy == PolicyLRU { // W-TinyLFU may reject it already
						t.Fatalf("key %d missing right after its add", i)
					}
				}
				l.remove(keys[i])
				removed.Store(int64(i))
			}
			close(stop)
			wg.Wait()
		})
	}
}

// Hash collisions in the index: two keys of one hash share its slot, and keys of different hashes
// that start their probes at one slot find each other's chain across tombstones.
func TestL1IndexCollisions(t *testing.T) {
	tomb := new(l1entry[int])
	tbl := newL1Index(0, tomb)
	key := func(id string, h uint64) Key { k := NewKey("c", id); k.h = h; return k }
	a := key("a", 5<<32|1)
	b := key("b", 5<<32|1) // a's hash
	c := key("c", 5<<32|2) // another hash, the same first slot
	d := key("d", 6<<32|3) // the next slot: pushed along by c
	entry := func(k Key, v int) *l1entry[int] { e := testEntry(v); e.key = k; return e }
	tbl.put(a.h, entry(a, 1))
	tbl.put(c.h, entry(c, 3))
	tbl.put(d.h, entry(d, 4))
	if e := tbl.find(b); e != nil {
		t.Fatalf("find(b) = %v, the entry of a", e.val)
	}
	tbl.put(b.h, entry(b, 2)) // replaces a: one slot per hash
	if e := tbl.find(a); e != nil {
		t.Fatalf("find(a) = %v after b took its hash", e.val)
	}
	if e := tbl.find(b); e == nil || e.val != 2 {
		t.Fatalf("find(b) = %v, want 2", e)
	}
	if tbl.live != 3 {
		t.Fatalf("live = %d, want 3", tbl.live)
	}
	if !tbl.remove(b.h) || tbl.remove(b.h) {
		t.Fatal("remove(b) did not remove exactly once")
	}
	for _, k := range []Key{c, d} { // past b's tombstone
		if e := tbl.find(k); e == nil || e.key != k {
			t.Fatalf("find(%v) = %v after b's removal", k.ID(), e)
		}
	}
	tbl.put(a.h, entry(a, 5)) // reuses the tombstone
	if tbl.used != 3 || tbl.live != 3 {
		t.Errorf("used %d, live %d; want 3 and 3: the tombstone was not reused", tbl.used, tbl.live)
	}
	nt := tbl.rebuilt()
	for _, k := range []Key{a, c, d} {
		if e := nt.find(k); e == nil || e.key != k {
			t.Fatalf("after a rebuild find(%v) = %v", k.ID(), e)
		}
	}
	if nt.find(b) != nil || nt.live != 3 || nt.used != 3 {
		t.Errorf("the rebuilt table: b found, or %d live, %d used", nt.live, nt.used)
	}
}

// Concurrent hits, adds, removals, purges and rebuilds on small L1s (so that entries are evicted
// and tables rebuilt all the time): every hit returns its own key's entry and a value written for
// that key. Run with -race; about a second.
func TestL1IndexStress(t *testing.T) {
	for _, policy := range []Policy{PolicyLRU, PolicyTinyLFU} {
		t.Run(fmt.Sprint(policy), func(t *testing.T) {
			l := newL1[int](400, policy)
			keys := make([]Key, 1000)
			for i := range keys {
				keys[i] = NewKey("s", strconv.Itoa(i))
			}
			for i := 1; i < len(keys); i += 10 { // some keys collide
				keys[i].h = keys[i-1].h
			}
			deadline := time.Now().Add(400 * time.Millisecond)
			var wg sync.WaitGroup
			var hits atomic.Int64
			for g := range 4 {
				wg.Go(func() {
					rng := rand.New(rand.NewPCG(uint64(g), 3))
					for n := 0; ; n++ {
						if n%256 == 0 && time.Now().After(deadline) {
							return
						}
						i := rng.IntN(len(keys))
						k := keys[i]
						switch r := rng.IntN(100); {
						case g < 2 || r < 60: // values encode their key: i*1e6 + a version
							if e, ok := l.get(k); ok {
								if e.key != k || e.val/1_000_000 != i {
									t.Errorf("get(key %d) returned %v, value %d", i, e.key, e.val)
									return
								}
								hits.Add(1)
							}
						case r < 85:
							l.add(k, testEntry(i*1_000_000+n%1_000_000))
						case r < 97:
							l.remove(k)
						case r < 99:
							l.removeIf(func(k Key, _ *l1entry[int]) bool { return k.ID() == strconv.Itoa(i) })
						default:
							if rng.IntN(20) == 0 {
								l.purge()
							}
						}
					}
				})
			}
			wg.Wait()
			checkInStep(t, l, keys)
			if got, _, _ := l.counts(); got != uint64(hits.Load()) {
				t.Errorf("counted %d hits, want %d", got, hits.Load())
			}
		})
	}
}

// A marked LRU entry (hit while due) at the end of the list moves to the front instead of being
// evicted; an unmarked one is evicted.
func TestL1SecondChance(t *testing.T) {
	l := newL1[int](100, PolicyLRU) // one shard, lazy promotion after 25 moves
	k := func(i int) Key { return NewKey("k", strconv.Itoa(i)) }
	for i := range 100 {
		l.add(k(i), testEntry(i))
	}
	if _, ok := l.get(k(0)); !ok { // 99 moves since k0's: due, marked
		t.Fatal("miss")
	}
	if _, ok := l.get(k(99)); !ok { // just added: not due, not marked
		t.Fatal("miss")
	}
	l.add(k(100), testEntry(100))
	for i, want := range map[int]bool{0: true, 1: false, 2: true, 99: true, 100: true} {
		if _, ok := l.recheck(k(i)); ok != want {
			t.Errorf("k%d present = %v, want %v", i, ok, want)
		}
	}
}

// snapshot copies every field of an entry but moved and ref: a field added to l1entry and not to
// snapshot fails here.
func TestL1SnapshotCopiesEveryField(t *testing.T) {
	e := new(l1entry[int])
	v := reflect.ValueOf(e).Elem()
	for i := range v.NumField() {
		f := v.Field(i)
		f = reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem() // unexported fields
		switch f.Kind() {
		case reflect.Bool:
			f.SetBool(true)
		case reflect.Int, reflect.Int64:
			f.SetInt(int64(i + 1))
		case reflect.Uint8, reflect.Uint32, reflect.Uint64:
			f.SetUint(uint64(i + 1))
		case reflect.Slice:
			f.Set(reflect.ValueOf([]string{"t"}))
		case reflect.Struct: // Key
			f.Set(reflect.ValueOf(NewKey("a", "1")))
		default:
			t.Fatalf("field %s: kind %v not handled by this test", v.Type().Field(i).Name, f.Kind())
		}
	}
	got := newL1[int](10, PolicyLRU).snapshot(e.key, e)
	want := *e
	want.moved, want.ref = 0, 0
	if !reflect.DeepEqual(got, want) {
		t.Errorf("snapshot = %+v\nwant       %+v", got, want)
	}
}

// Shards are two cache lines: the fields hits read in the first, the lock in the second.
func TestL1ShardLayout(t *testing.T) {
	var s l1shard[ImageMeta]
	if size := unsafe.Sizeof(s); size != 128 {
		t.Errorf("l1shard is %d bytes, want 128", size)
	}
	if off := unsafe.Offsetof(s.mu); off != 64 {
		t.Errorf("l1shard.mu at %d, want 64", off)
	}
	if size := unsafe.Sizeof(hitStripe{}); size != 64 {
		t.Errorf("hitStripe is %d bytes, want 64", size)
	}
	if size := unsafe.Sizeof(l1entry[ImageMeta]{}); size > 240 {
		t.Errorf("l1entry[ImageMeta] is %d bytes: past the 240-byte size class", size)
	}
}

// BenchmarkL1HitPolicy is an L1 hit under each policy, without the Cache around it, from one
// goroutine and from GOMAXPROCS: 4,096 keys in an L1 of 10,000 entries, as in bench/.
func BenchmarkL1HitPolicy(b *testing.B) {
	keys := make([]Key, 4096)
	for i := range keys {
		keys[i] = NewKey("artist", strconv.Itoa(i)).With("type", "avatar").With("size", "256")
	}
	for _, p := range []struct {
		name   string
		policy Policy
	}{{"lru", PolicyLRU}, {"tinylfu", PolicyTinyLFU}} {
		l := newL1[int](DefaultL1Size, p.policy)
		for i, k := range keys {
			l.add(k, testEntry(i))
		}
		for range 2 { // promote, and mark
			for _, k := range keys {
				l.get(k)
			}
		}
		b.Run(p.name+"/serial", func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				if _, ok := l.get(keys[i&4095]); !ok {
					b.Fatal("miss")
				}
			}
		})
		b.Run(p.name+"/parallel", func(b *testing.B) {
			b.ReportAllocs()
			var worker atomic.Int64
			b.RunParallel(func(pb *testing.PB) {
				for i := int(worker.Add(1)) * 997; pb.Next(); i++ {
					l.get(keys[i&4095])
				}
			})
		})
	}
}
