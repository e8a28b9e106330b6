package imgcache

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"testing"
	"time"
	"unsafe"

	"github.com/cespare/xxhash/v2"
)

// What one L1 entry of a Cache[ImageMeta] costs on the heap, measured rather than estimated:
//
//	go test -run '^$' -bench L1MemoryPerEntry .   # B/entry, set by Set and filled from Redis
//	go test -run L1MemoryPerEntry -v .            # the same, broken down by part
//
// The entries are realistic: key NewKey("artist", id).With("type", "avatar").With("size", "512")
// with ids 1 to 100,000, and an ImageMeta with a path like /srv/images/artists/12345/avatar.webp,
// MIME type image/webp (a shared constant, as services use), a quoted 16-hex-digit ETag, a size,
// 512x512 and a ModTime. The L1 is W-TinyLFU (PolicyAuto at this size). On amd64 with Go 1.26 an
// entry stored by Set costs 530 B:
//
//	key's string            64 B  the canonical form "artist\0" id "\0size\0512\0type\0avatar"
//	                              (33 B for a 5-digit id) and the Redis form "artist:" id ":" and
//	                              16 hex digits (29 B), 62 B in the 64 B size class. The Key itself
//	                              (string header, hash and length, 32 B) is held inline in the
//	                              entry.
//	value's strings         72 B  Path (37 B, 48 B class) and ETag (18 B, 24 B class); the
//	                              MIMEType constant is shared
//	*l1entry[ImageMeta]    240 B  240 B: ImageMeta 112 B, seven int64 of expiry and bookkeeping,
//	                              the write's hash, the move count, three flags and the mark, the
//	                              tags slice header and the Key
//	map slot                24 B  the key's 64-bit hash and a pointer in a Swiss-table group with
//	                              its control byte, at the tables' load
//	list element, sketch   130 B  golang-lru's element (next, prev, list, hash, value, ExpiresAt,
//	and read index                ExpireBucket: 72 B, 80 B class), W-TinyLFU's sketch (8 B) and
//	                              the shard's read index (18 B: 8-byte slots, 2 to 4 per entry
//	                              as its tables grow; 2.3 here)
//
// An entry filled from Redis costs 554 B: UnmarshalBinary keeps all four strings in one allocation
// of the whole binary form (87 B, 96 B class) instead of two, 24 B more.

// memEntries is how many entries the measurements store: enough that per-cache constants (the
// shards, the clock) vanish in the per-entry figure, few enough to take well under a second.
const memEntries = 100_000

// memBound is the most bytes per entry TestL1MemoryPerEntry accepts. Measured: 530 B by Set,
// 554 B filled from Redis. The map's share alone can move by 35 B with the entry count (where its
// tables are in their growth), the read index's by 16 B, and a field added to l1entry can move it
// to the next size class (16 B): 650 B leaves room for all three, and fails on a new allocation per
// entry of 150 B or on anything near a doubling.
const memBound = 650

func memKey(i int) Key {
	return NewKey("artist", strconv.Itoa(i)).With("type", "avatar").With("size", "512")
}

// memMeta returns a realistic value for artist i: its strings are allocated per value, as a
// service reading them from a database would, except the MIME type, a constant.
func memMeta(i int) ImageMeta {
	id := strconv.Itoa(i)
	return ImageMeta{
		Path:     "/srv/images/artists/" + id + "/avatar.webp",
		Size:     40_000 + int64(i),
		MIMEType: "image/webp",
		Width:    512,
		Height:   512,
		ETag:     fmt.Sprintf(`"%016x"`, xxhash.Sum64String(id)),
		ModTime:  time.Date(2026, 3, 14, 15, 9, 26, 535897932, time.UTC).Add(time.Duration(i) * time.Second),
	}
}

// memMetaDecoded is memMeta as an L2 fill stores it: decoded from its binary form, which keeps all
// the strings in one allocation.
func memMetaDecoded(tb testing.TB, i int) ImageMeta {
	b, err := memMeta(i).MarshalBinary()
	if err != nil {
		tb.Fatal(err)
	}
	var m ImageMeta
	if err := m.UnmarshalBinary(b); err != nil {
		tb.Fatal(err)
	}
	return m
}

// liveHeap returns the bytes of live heap objects after a full collection.
func liveHeap() int64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc)
}

// newMemCache returns an L1-only cache that holds memEntries without evicting: shards are filled
// unevenly by the hash, so L1Size has 10% to spare (the map and the list grow with the entries, not
// with L1Size).
func newMemCache(tb testing.TB) *Cache[ImageMeta] {
	tb.Helper()
	c, err := New[ImageMeta](Options{L1Size: memEntries + memEntries/10})
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// measureL1PerEntry fills a fresh L1-only cache with memEntries entries, each key and value built
// just before its Set so that only the cache holds them, and returns the live heap it added per entry.
func measureL1PerEntry(tb testing.TB, value func(int) ImageMeta) float64 {
	tb.Helper()
	before := liveHeap()
	c := newMemCache(tb)
	defer c.Close()
	for i := 1; i <= memEntries; i++ {
		if err := c.Set(context.Background(), memKey(i), value(i)); err != nil {
			tb.Fatal(err)
		}
	}
	after := liveHeap()
	if n := c.Stats().L1Entries; n != memEntries {
		tb.Fatalf("L1 holds %d entries, want %d", n, memEntries)
	}
	runtime.KeepAlive(c)
	return float64(after-before) / memEntries
}

func BenchmarkL1MemoryPerEntry(b *testing.B) {
	for _, bc := range []struct {
		name  string
		value func(int) ImageMeta
	}{
		{"set", memMeta},
		{"l2fill", func(i int) ImageMeta { return memMetaDecoded(b, i) }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var sum float64
			for range b.N {
				sum += measureL1PerEntry(b, bc.value)
			}
			b.ReportMetric(sum/float64(b.N), "B/entry")
			b.ReportMetric(0, "ns/op") // the time is mostly forced collections: not a figure
		})
	}
}

// TestL1MemoryPerEntry measures the heap per L1 entry, in total and part by part, and fails if the
// total passes memBound.
func TestL1MemoryPerEntry(t *testing.T) {
	if testing.Short() {
		t.Skip("fills 100,000 entries")
	}
	for _, tc := range []struct {
		name  string
		value func(int) ImageMeta
	}{
		{"set", memMeta},
		{"l2fill", func(i int) ImageMeta { return memMetaDecoded(t, i) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			total := measureL1PerEntry(t, tc.value)
			parts := measureL1Parts(t, tc.value)
			sum := 0.0
			for _, p := range parts {
				t.Logf("%-28s %6.1f B", p.name, p.bytes)
				sum += p.bytes
			}
			t.Logf("%-28s %6.1f B (measured whole: %.1f B)", "sum of the parts", sum, total)
			if total > memBound {
				t.Errorf("an L1 entry costs %.1f B of heap; the bound is %d B", total, memBound)
			}
			// The parts are measured separately and rounded by the same size classes: a large
			// difference means an allocation per entry that the breakdown does not know of.
			if d := total - sum; d > 24 || d < -24 {
				t.Errorf("the parts add up to %.1f B, the whole is %.1f B", sum, total)
			}
		})
	}
}

type memPart struct {
	name  string
	bytes float64
}

// measureL1Parts builds the same entries in stages, each kept alive, and attributes each stage's
// growth of the live heap: the keys' strings, the values' strings, the *l1entry, and golang-lru's
// map and list (the map measured on its own, with the same number of entries per shard).
func measureL1Parts(t *testing.T, value func(int) ImageMeta) []memPart {
	const n = memEntries
	per := func(delta int64, fixed uintptr) float64 { return float64(delta)/n - float64(fixed) }

	h0 := liveHeap()
	keys := make([]Key, n)
	for i := range keys {
		keys[i] = memKey(i + 1)
	}
	h1 := liveHeap()
	vals := make([]ImageMeta, n)
	for i := range vals {
		vals[i] = value(i + 1)
	}
	h2 := liveHeap()
	c := newMemCache(t)
	defer c.Close()
	for i := range keys {
		if err := c.Set(context.Background(), keys[i], vals[i]); err != nil {
			t.Fatal(err)
		}
	}
	h3 := liveHeap()
	entries := make([]*l1entry[ImageMeta], n)
	for i := range entries {
		entries[i] = &l1entry[ImageMeta]{val: vals[i]}
	}
	h4 := liveHeap()
	shards := len(c.l1.shards)
	maps := make([]map[uint64]*l1entry[ImageMeta], shards)
	for i := range maps {
		maps[i] = make(map[uint64]*l1entry[ImageMeta])
	}
	for i, k := range keys {
		maps[k.h&uint64(shards-1)][k.h] = entries[i]
	}
	h5 := liveHeap()
	runtime.KeepAlive(keys)
	runtime.KeepAlive(vals)
	runtime.KeepAlive(c)
	runtime.KeepAlive(entries)
	runtime.KeepAlive(maps)

	l1e := per(h4-h3, unsafe.Sizeof(entries[0]))
	mapSlot := per(h5-h4, 0)
	return []memPart{
		{"key's string", per(h1-h0, unsafe.Sizeof(Key{}))},
		{"value's strings", per(h2-h1, unsafe.Sizeof(ImageMeta{}))},
		{fmt.Sprintf("*l1entry (%d B struct)", unsafe.Sizeof(l1entry[ImageMeta]{})), l1e},
		{fmt.Sprintf("map slot (%d shards)", shards), mapSlot},
		{"list element and sketch (the rest)", per(h3-h2, 0) - l1e - mapSlot},
	}
}
