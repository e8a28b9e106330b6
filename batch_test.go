package imgcache

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// roundTrips records every call a client makes to Redis: one command, or one pipeline, each.
type roundTrips struct {
	mu    sync.Mutex
	calls [][][]any // per call, the args of its commands
}

func (r *roundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }
func (r *roundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return beforeCall(r.recordCall).ProcessHook(next)
}
func (r *roundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return beforeCall(r.recordCall).ProcessPipelineHook(next)
}

func (r *roundTrips) recordCall(_ context.Context, cmds []redis.Cmder) { r.record(cmds) }

// beforeCall is a client hook that runs before each call to Redis with its context and commands:
// one command's, or one pipeline's.
type beforeCall func(ctx context.Context, cmds []redis.Cmder)

func (beforeCall) DialHook(next redis.DialHook) redis.DialHook { return next }
func (f beforeCall) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		f(ctx, []redis.Cmder{cmd})
		return next(ctx, cmd)
	}
}
func (f beforeCall) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		f(ctx, cmds)
		return next(ctx, cmds)
	}
}

func (r *roundTrips) record(cmds []redis.Cmder) {
	call := make([][]any, len(cmds))
	for i, c := range cmds {
		call[i] = c.Args()
	}
	r.mu.Lock()
	r.calls = append(r.calls, call)
	r.mu.Unlock()
}

// take returns the calls recorded since the last take, as "name name ..." per call.
func (r *roundTrips) take() (names []string, calls [][][]any) {
	r.mu.Lock()
	calls, r.calls = r.calls, nil
	r.mu.Unlock()
	for _, call := range calls {
		var n []string
		for _, args := range call {
			n = append(n, strings.ToLower(fmt.Sprint(args[0])))
		}
		names = append(names, strings.Join(n, " "))
	}
	return names, calls
}

// countedCache is a cache on e whose Redis calls are recorded.
func countedCache(t *testing.T, e *testEnv, o Options) (*Cache[ImageMeta], *roundTrips) {
	rt := &roundTrips{}
	o.Redis = heldClient(t, e, rt)
	return newCache[ImageMeta](e, o), rt
}

// testLoader is a batch loader that records the keys each call was given; it finds the keys for
// which have is true (all, if have is nil), with metaV(id, 1).
type testLoader struct {
	mu    sync.Mutex
	calls [][]Key
	have  func(Key) bool
}

func (l *testLoader) load(_ context.Context, ks []Key) (map[Key]ImageMeta, error) {
	l.mu.Lock()
	l.calls = append(l.calls, slices.Clone(ks))
	l.mu.Unlock()
	m := make(map[Key]ImageMeta)
	for _, k := range ks {
		if l.have == nil || l.have(k) {
			m[k] = metaV(k.ID(), 1)
		}
	}
	return m, nil
}

func (l *testLoader) callsSoFar() [][]Key {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.calls)
}

// wantGetMany checks c.GetMany(ks)'s ETags, "-" for a key not found.
func wantGetMany(t *testing.T, c *Cache[ImageMeta], ks []Key, want ...string) {
	t.Helper()
	vals, found, err := c.GetMany(ctx, ks)
	if err != nil {
		t.Fatal(err)
	}
	if got := etags(vals, found); !slices.Equal(got, want) {
		t.Errorf("GetMany = %q, want %q", got, want)
	}
}

func etags(vals []ImageMeta, found []bool) []string {
	out := make([]string, len(vals))
	for i, v := range vals {
		if found[i] {
			out[i] = v.ETag
		} else {
			out[i] = "-"
		}
	}
	return out
}

func TestGetManyMixedLevelsAndDuplicates(t *testing.T) {
	e := newNodeEnv(t) // counts round trips (one MGET on a single node)
	writer := newCache[ImageMeta](e, e.opts())
	c, rt := countedCache(t, e, e.opts())
	inL1 := NewKey("artist", "1")
	inL2 := NewKey("artist", "2").With("type", "avatar")
	inL2b := NewKey("artist", "2").With("type", "cover") // same entity: one generation key read
	absent := NewKey("artist", "3")
	notFound := NewKey("artist", "4")
	if err := c.Set(ctx, inL1, metaV("1", 1)); err != nil {
		t.Fatal(err)
	}
	for _, k := range []Key{inL2, inL2b} {
		if err := writer.Set(ctx, k, metaV(k.ID(), 1)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := writer.GetOrLoad(ctx, notFound, func(context.Context) (ImageMeta, error) { return ImageMeta{}, ErrNotFound }); !errors.Is(err, ErrNotFound) {
		t.Fatal(err)
	}
	eventually(t, func() error { // the Sets' bus messages, which drop nothing here, are in
		if n := c.Stats().BusReceived; n != 2 {
			return fmt.Errorf("BusReceived = %d, want 2", n)
		}
		return nil
	})
	before := c.Stats()
	rt.take()

	ks := []Key{inL1, inL2, absent, inL2b, inL2, notFound, inL1, absent}
	vals, found, err := c.GetMany(ctx, ks)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{`"1-v1"`, `"2-v1"`, "-", `"2-v1"`, `"2-v1"`, "-", `"1-v1"`, "-"}
	if got := etags(vals, found); !slices.Equal(got, want) {
		t.Errorf("GetMany = %q, want %q", got, want)
	}
	names, calls := rt.take()
	if len(names) != 1 || names[0] != "mget" {
		t.Fatalf("GetMany made the Redis calls %q, want one MGET", names)
	}
	// The values of inL2, inL2b, absent and notFound (each once), and the generations of artist
	// 2, 3 and 4 (each once).
	if args := calls[0][0]; len(args) != 1+4+3 {
		t.Errorf("MGET %v: want 4 values and 3 generations", args[1:])
	}
	s := c.Stats()
	for _, d := range []struct {
		name      string
		got, want uint64
	}{
		{"L1Hits", s.L1Hits - before.L1Hits, 2},
		{"L2Hits", s.L2Hits - before.L2Hits, 4}, // inL2 twice, inL2b, notFound
		{"NegativeHits", s.NegativeHits - before.NegativeHits, 1},
		{"Misses", s.Misses - before.Misses, 2},
		{"L2Errors", s.L2Errors - before.L2Errors, 0},
	} {
		if d.got != d.want {
			t.Errorf("%s went up by %d, want %d", d.name, d.got, d.want)
		}
	}
	// The Redis hits are in L1 now: a second GetMany makes no Redis call for them.
	if _, _, err := c.GetMany(ctx, []Key{inL2, inL2b, notFound, inL1}); err != nil {
		t.Fatal(err)
	}
	if names, _ := rt.take(); len(names) != 0 {
		t.Errorf("GetMany of L1 entries made the Redis calls %q", names)
	}
	// Nothing to read, and an empty batch, are fine.
	if vals, found, err := c.GetMany(ctx, nil); err != nil || len(vals) != 0 || len(found) != 0 {
		t.Errorf("GetMany(nil) = %v, %v, %v", vals, found, err)
	}
}

// Values stamped with tags cost one more round trip for all their tags, and an invalidated tag
// makes its values misses. Once the reader trusts the generations it read (gens.go), a batch is
// one MGET of the values alone.
func TestGetManyChecksTagsInOneRoundTrip(t *testing.T) {
	e := newNodeEnv(t) // counts round trips (one MGET on a single node)
	writer := newCache[ImageMeta](e, e.opts())
	o := e.opts()
	o.L1Size = -1
	c, rt := countedCache(t, e, o)
	var ks []Key
	for i := range 6 {
		k := NewKey("album", fmt.Sprint(i))
		ks = append(ks, k)
		if err := writer.Set(ctx, k, metaV(k.ID(), 1), WithTags("label:"+fmt.Sprint(i%2), "all")); err != nil {
			t.Fatal(err)
		}
	}
	if err := writer.InvalidateTags(ctx, "label:1"); err != nil {
		t.Fatal(err)
	}
	heard(t, c, 7)
	want := []string{`"0-v1"`, "-", `"2-v1"`, "-", `"4-v1"`, "-"}
	rt.take()
	wantGetMany(t, c, ks, want...)
	_, calls := rt.take()
	names, calls := withoutHandshakes(calls)
	if len(names) != 2 || names[0] != "mget" || names[1] != "hget hget" {
		t.Errorf("GetMany made the Redis calls %q, want an MGET and one pipeline of an HGET per tag", names)
	} else if tags := fmt.Sprint(calls[1]); !strings.Contains(tags, "%t:label%3A0") || !strings.Contains(tags, "%t:all") {
		t.Errorf("tag generations read: %v", tags)
	}
	wantGetMany(t, c, ks, want...)
	_, calls = rt.take()
	if names, calls = withoutHandshakes(calls); len(names) != 1 || names[0] != "mget" || len(calls[0][0]) != 1+len(ks) {
		t.Errorf("a second GetMany made the Redis calls %v, want an MGET of the values alone", calls)
	}
}

// Values whose stamp is out of date (their bookkeeping evicted) or that do not decode are misses,
// counted, and deleted from Redis.
func TestGetManyValidatesValues(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	good, evicted, garbage := NewKey("artist", "1"), NewKey("artist", "2"), NewKey("artist", "3")
	for _, k := range []Key{good, evicted, garbage} {
		if err := c.Set(ctx, k, metaV(k.ID(), 1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.rdb.Del(ctx, e.ns+":%g:{artist:2}").Err(); err != nil { // as an eviction would
		t.Fatal(err)
	}
	if err := e.rdb.Set(ctx, e.redisKey(garbage), "not an envelope", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	o := e.opts()
	o.L1Size = -1
	reader := newCache[ImageMeta](e, o)
	vals, found, err := reader.GetMany(ctx, []Key{good, evicted, garbage})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := etags(vals, found), []string{`"1-v1"`, "-", "-"}; !slices.Equal(got, want) {
		t.Errorf("GetMany = %q, want %q", got, want)
	}
	s := reader.Stats()
	if s.L2Stale != 1 || s.L2Unreadable != 1 || s.L2Hits != 1 || s.Misses != 2 {
		t.Errorf("stats %+v: want 1 stale, 1 unreadable, 1 L2 hit, 2 misses", s)
	}
	if e.raw(evicted) != "" || e.raw(garbage) != "" {
		t.Errorf("the stale and the unreadable value are still in Redis")
	}
}

// On a client other than *redis.Client (a Ring here; a Cluster takes the same path), the batch is
// a pipeline of GETs, which go-redis splits by node.
func TestGetManyOnARing(t *testing.T) {
	e := newNodeEnv(t) // a Ring over one node's address
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": e.node().Options().Addr}, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = ring.Close() })
	rt := &roundTrips{}
	ring.AddHook(rt)
	o := e.opts()
	o.Redis, o.L1Size = ring, -1
	c := newCache[ImageMeta](e, o)
	a, b := NewKey("artist", "1"), NewKey("artist", "2")
	if err := newCache[ImageMeta](e, e.opts()).Set(ctx, a, metaV("1", 1)); err != nil {
		t.Fatal(err)
	}
	heard(t, c, 1) // its message, arriving mid-batch, would keep the batch from trusting a's generation
	rt.take()
	vals, found, err := c.GetMany(ctx, []Key{a, b, a})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := etags(vals, found), []string{`"1-v1"`, "-", `"1-v1"`}; !slices.Equal(got, want) {
		t.Errorf("GetMany = %q, want %q", got, want)
	}
	if names, _ := rt.take(); len(names) != 1 || names[0] != "get get get get" {
		t.Errorf("GetMany on a Ring made the Redis calls %q, want one pipeline of 2 values and 2 generations", names)
	}
	// a's generation is trusted now; b has none (it was never stored), so it is read again.
	wantGetMany(t, c, []Key{a, b, a}, `"1-v1"`, "-", `"1-v1"`)
	if names, _ := rt.take(); len(names) != 1 || names[0] != "get get get" {
		t.Errorf("a second GetMany on a Ring made the Redis calls %q, want one pipeline of 2 values and b's generation", names)
	}
}

// When one node of a Ring (or Cluster) is down, the batch's GETs to it fail and those keys are
// misses; the keys on the other node are answered.
func TestGetManyWithANodeDown(t *testing.T) {
	up, down := miniredis.RunT(t), miniredis.RunT(t)
	ring := redis.NewRing(&redis.RingOptions{
		Addrs:                 map[string]string{"up": up.Addr(), "down": down.Addr()},
		ContextTimeoutEnabled: true,
		HeartbeatFrequency:    time.Hour, // the Ring keeps sending to the dead node
	})
	t.Cleanup(func() { _ = ring.Close() })
	e := &testEnv{t: t, mr: up, ns: uniqueNamespace(t)}
	o := e.opts()
	o.Redis, o.L1Size, o.BreakerThreshold = ring, -1, -1
	writer := newCache[ImageMeta](e, o)
	var ks []Key
	for i := range 20 {
		k := NewKey("artist", fmt.Sprint(i))
		ks = append(ks, k)
		if err := writer.Set(ctx, k, metaV(k.ID(), 1)); err != nil {
			t.Fatal(err)
		}
	}
	down.Close()
	before := len(up.Keys())
	reader := newCache[ImageMeta](e, o)
	vals, found, err := reader.GetMany(ctx, ks)
	if err != nil {
		t.Fatalf("GetMany with a node down: %v", err)
	}
	n := 0
	for i, f := range found {
		if f {
			n++
			if want := metaV(ks[i].ID(), 1).ETag; vals[i].ETag != want {
				t.Errorf("key %v: ETag %s, want %s", ks[i], vals[i].ETag, want)
			}
		}
	}
	if n == 0 || n == len(ks) {
		t.Errorf("%d of %d keys found with one of two nodes down; want some, not all", n, len(ks))
	}
	if reader.Stats().L2Errors == 0 {
		t.Error("the failed GETs were not counted")
	}
	// A value whose generation could not be read is not judged: nothing on the live node is
	// deleted as stale.
	if after := len(up.Keys()); after != before {
		t.Errorf("%d keys on the live node after the batch, %d before", after, before)
	}
}

func TestGetManyFailsOpen(t *testing.T) {
	for _, fault := range []string{"erroring", "down"} {
		t.Run(fault, func(t *testing.T) {
			e := newMiniEnv(t)
			c := newCache[ImageMeta](e, e.opts())
			cached := NewKey("artist", "1")
			if err := c.Set(ctx, cached, metaV("1", 1)); err != nil {
				t.Fatal(err)
			}
			if fault == "down" {
				e.mr.Close()
			} else {
				e.mr.SetError("ERR injected")
			}
			before := c.Stats()
			ks := []Key{cached, NewKey("artist", "2"), NewKey("artist", "3")}
			vals, found, err := c.GetMany(ctx, ks)
			if err != nil {
				t.Fatalf("GetMany with Redis %s: %v", fault, err)
			}
			if got, want := etags(vals, found), []string{`"1-v1"`, "-", "-"}; !slices.Equal(got, want) {
				t.Errorf("GetMany = %q, want %q", got, want)
			}
			s := c.Stats()
			if d := s.L2Errors - before.L2Errors; d != 1 {
				t.Errorf("L2Errors went up by %d, want 1 (one failed round trip)", d)
			}
			if d := s.Misses - before.Misses; d != 2 {
				t.Errorf("Misses went up by %d, want 2", d)
			}
			// GetOrLoadMany still answers from the loader.
			l := &testLoader{}
			vals, found, err = c.GetOrLoadMany(ctx, ks, l.load)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := etags(vals, found), []string{`"1-v1"`, `"2-v1"`, `"3-v1"`}; !slices.Equal(got, want) {
				t.Errorf("GetOrLoadMany = %q, want %q", got, want)
			}
			if calls := l.callsSoFar(); len(calls) != 1 || len(calls[0]) != 2 {
				t.Errorf("loader calls %v, want one of the 2 missing keys", calls)
			}
		})
	}
}

func TestBatchBadInputClosedAndNilLoader(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	l := &testLoader{}
	good := NewKey("artist", "1")
	for name, ks := range map[string][]Key{
		"zero key":  {good, {}},
		"empty id":  {good, NewKey("artist", "")},
		"too long":  {good, NewKey("artist", strings.Repeat("%", 400))},
		"bad param": {good, NewKey("artist", "1").With("a", "\n")},
	} {
		t.Run(name, func(t *testing.T) {
			if _, _, err := c.GetMany(ctx, ks); err == nil || !strings.HasPrefix(err.Error(), "imgcache: ") || !strings.Contains(err.Error(), "ks[1]") {
				t.Errorf("GetMany: %v, want an imgcache error naming ks[1]", err)
			}
			if _, _, err := c.GetOrLoadMany(ctx, ks, l.load); err == nil || !strings.Contains(err.Error(), "ks[1]") {
				t.Errorf("GetOrLoadMany: %v, want an error naming ks[1]", err)
			}
		})
	}
	if _, _, err := c.GetOrLoadMany(ctx, []Key{good}, nil); err == nil || !strings.HasPrefix(err.Error(), "imgcache: ") {
		t.Errorf("GetOrLoadMany with a nil load: %v", err)
	}
	if _, _, err := c.GetOrLoadMany(ctx, []Key{good}, l.load, WithTTL(time.Microsecond)); err == nil || !strings.HasPrefix(err.Error(), "imgcache: ") {
		t.Errorf("GetOrLoadMany with a bad TTL: %v", err)
	}
	if _, _, err := c.GetOrLoadMany(ctx, []Key{good}, l.load, WithTags("")); err == nil {
		t.Errorf("GetOrLoadMany with an empty tag: %v", err)
	}
	if calls := l.callsSoFar(); len(calls) != 0 {
		t.Errorf("the loader was called for bad input: %v", calls)
	}
	if keys := e.namespaceKeys(); len(keys) != 0 {
		t.Errorf("bad input wrote %v", keys)
	}
	_ = c.Close()
	if _, _, err := c.GetMany(ctx, []Key{good}); !errors.Is(err, ErrClosed) {
		t.Errorf("GetMany after Close: %v, want ErrClosed", err)
	}
	if _, _, err := c.GetOrLoadMany(ctx, []Key{good}, l.load); !errors.Is(err, ErrClosed) {
		t.Errorf("GetOrLoadMany after Close: %v, want ErrClosed", err)
	}
}

func TestGetOrLoadManyLoadsTheMissingKeysOnce(t *testing.T) {
	e := newNodeEnv(t) // counts round trips (one MGET on a single node)
	o := e.opts()
	o.L2Timeout = 5 * time.Second // 40 scripts on miniredis under -race can take longer than 100ms
	c, rt := countedCache(t, e, o)
	other := newCache[ImageMeta](e, o)
	inL1, inL2 := NewKey("artist", "1"), NewKey("artist", "2")
	if err := c.Set(ctx, inL1, metaV("1", 0)); err != nil {
		t.Fatal(err)
	}
	if err := other.Set(ctx, inL2, metaV("2", 0)); err != nil {
		t.Fatal(err)
	}
	var ks []Key
	for i := 3; i < 23; i++ {
		ks = append(ks, NewKey("artist", fmt.Sprint(i)).With("type", "avatar"))
	}
	gone := ks[1] // the loader does not find it
	l := &testLoader{have: func(k Key) bool { return k != gone }}
	batch := append([]Key{inL1, inL2, ks[0]}, ks...)
	before := c.Stats()
	rt.take()
	vals, found, err := c.GetOrLoadMany(ctx, batch, l.load, WithTTL(time.Hour), WithTags("batch"))
	if err != nil {
		t.Fatal(err)
	}
	for i, k := range batch {
		want := `"` + k.ID() + `-v1"`
		switch {
		case k == inL1 || k == inL2:
			want = `"` + k.ID() + `-v0"`
		case k == gone:
			want = "-"
		}
		if got := etags(vals, found)[i]; got != want {
			t.Errorf("position %d (%v) = %s, want %s", i, k, got, want)
		}
	}
	if calls := l.callsSoFar(); len(calls) != 1 || !slices.Equal(calls[0], ks) {
		t.Fatalf("loader calls %v, want one with exactly the 20 missing keys %v", calls, ks)
	}
	// One MGET, one pipeline that registers the keys (and reads them again), one that writes and
	// verifies: a constant number of round trips for 20 keys.
	if names, _ := rt.take(); len(names) != 3 || names[0] != "mget" {
		t.Errorf("GetOrLoadMany made %d Redis calls, want 3: %q", len(names), names)
	}
	s := c.Stats()
	for _, d := range []struct {
		name      string
		got, want uint64
	}{
		{"L1Hits", s.L1Hits - before.L1Hits, 1},
		{"L2Hits", s.L2Hits - before.L2Hits, 1},
		{"Misses", s.Misses - before.Misses, 20},
		{"Coalesced", s.Coalesced - before.Coalesced, 1}, // ks[0] twice
		{"Loads", s.Loads - before.Loads, 1},
	} {
		if d.got != d.want {
			t.Errorf("%s went up by %d, want %d", d.name, d.got, d.want)
		}
	}
	// Stored in both levels, with the TTL and the tag; the key not found is remembered, in Redis too.
	if d := e.pttl(ks[0]); d < 59*time.Minute {
		t.Errorf("PTTL of a loaded key = %v, want about WithTTL's hour", d)
	}
	if e.raw(gone) == "" {
		t.Errorf("the key the loader did not find is not remembered in Redis")
	}
	vals, found, err = other.GetOrLoadMany(ctx, batch, l.load)
	if err != nil || len(l.callsSoFar()) != 1 {
		t.Fatalf("another instance loaded again: %v, %d calls", err, len(l.callsSoFar()))
	}
	if found[4] || !found[3] || vals[3].ETag != `"3-v1"` {
		t.Errorf("another instance got %q", etags(vals, found))
	}
	if err := c.InvalidateTags(ctx, "batch"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, ks[5]); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after InvalidateTags of the batch's tag: %v, want ErrNotFound", err)
	}
}

func TestGetOrLoadManyJoinsRunningLoads(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	a, b, d := NewKey("artist", "a"), NewKey("artist", "b"), NewKey("artist", "d")

	// A GetOrLoad of a is running: the batch waits for it and loads only b.
	started, release := make(chan struct{}), make(chan struct{})
	var single atomic.Int64
	done := make(chan error, 1)
	go func() {
		_, err := c.GetOrLoad(ctx, a, func(context.Context) (ImageMeta, error) {
			single.Add(1)
			close(started)
			<-release
			return metaV("a", 1), nil
		})
		done <- err
	}()
	<-started
	l := &testLoader{}
	got := make(chan []string, 1)
	go func() {
		vals, found, err := c.GetOrLoadMany(ctx, []Key{a, b}, l.load)
		if err != nil {
			t.Error(err)
		}
		got <- etags(vals, found)
	}()
	eventually(t, func() error {
		if len(l.callsSoFar()) == 0 {
			return errors.New("the batch has not loaded b yet")
		}
		return nil
	})
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if g := <-got; !slices.Equal(g, []string{`"a-v1"`, `"b-v1"`}) {
		t.Errorf("GetOrLoadMany = %q", g)
	}
	if calls := l.callsSoFar(); len(calls) != 1 || !slices.Equal(calls[0], []Key{b}) || single.Load() != 1 {
		t.Errorf("batch loader calls %v, single loads %d; want [b] and 1", calls, single.Load())
	}

	// A batch load of d is running: a GetOrLoad of d waits for it instead of loading.
	entered, unblock := make(chan struct{}), make(chan struct{})
	batchDone := make(chan error, 1)
	go func() {
		_, _, err := c.GetOrLoadMany(ctx, []Key{d}, func(ctx context.Context, ks []Key) (map[Key]ImageMeta, error) {
			close(entered)
			<-unblock
			return map[Key]ImageMeta{d: metaV("d", 1)}, nil
		})
		batchDone <- err
	}()
	<-entered
	before := c.Stats().Coalesced
	joined := make(chan string, 1)
	go func() {
		v, err := c.GetOrLoad(ctx, d, func(context.Context) (ImageMeta, error) {
			t.Error("GetOrLoad loaded a key that a batch is loading")
			return ImageMeta{}, nil
		})
		if err != nil {
			t.Error(err)
		}
		joined <- v.ETag
	}()
	eventually(t, func() error {
		if c.Stats().Coalesced == before {
			return errors.New("the GetOrLoad has not joined yet")
		}
		return nil
	})
	close(unblock)
	if err := <-batchDone; err != nil {
		t.Fatal(err)
	}
	if etag := <-joined; etag != `"d-v1"` {
		t.Errorf("the GetOrLoad that joined got %q", etag)
	}
}

// Overlapping batches and single loads from many goroutines load every key exactly once.
func TestGetOrLoadManyConcurrentLoadsEachKeyOnce(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	const n = 40
	keys := make([]Key, n)
	for i := range keys {
		keys[i] = NewKey("artist", fmt.Sprint(i))
	}
	var loads [n]atomic.Int64
	load := func(_ context.Context, ks []Key) (map[Key]ImageMeta, error) {
		time.Sleep(time.Millisecond)
		m := make(map[Key]ImageMeta, len(ks))
		for _, k := range ks {
			var i int
			_, _ = fmt.Sscan(k.ID(), &i)
			loads[i].Add(1)
			m[k] = metaV(k.ID(), 1)
		}
		return m, nil
	}
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if g%4 == 3 {
				k := keys[(g*7)%n]
				if v, err := c.GetOrLoad(ctx, k, func(ctx context.Context) (ImageMeta, error) {
					m, err := load(ctx, []Key{k})
					return m[k], err
				}); err != nil || v.ETag != `"`+k.ID()+`-v1"` {
					t.Errorf("GetOrLoad(%v) = %q, %v", k, v.ETag, err)
				}
				return
			}
			var ks []Key
			for i := g; i < g+2*n; i += 3 {
				ks = append(ks, keys[(i*5)%n])
			}
			vals, found, err := c.GetOrLoadMany(ctx, ks, load)
			if err != nil {
				t.Error(err)
			}
			for i, k := range ks {
				if !found[i] || vals[i].ETag != `"`+k.ID()+`-v1"` {
					t.Errorf("position %d (%v): %q, %v", i, k, vals[i].ETag, found[i])
				}
			}
		}()
	}
	wg.Wait()
	for i := range loads {
		if got := loads[i].Load(); got > 1 {
			t.Errorf("key %d loaded %d times", i, got)
		}
	}
}

func TestGetOrLoadManyLoaderErrors(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	cached, x, y := NewKey("artist", "1"), NewKey("artist", "2"), NewKey("artist", "3")
	if err := c.Set(ctx, cached, metaV("1", 1)); err != nil {
		t.Fatal(err)
	}
	ks := []Key{x, cached, y}
	boom := errors.New("database down")
	var calls atomic.Int64
	failing := func(context.Context, []Key) (map[Key]ImageMeta, error) { calls.Add(1); return nil, boom }
	for range 2 { // not cached: the second call loads again
		vals, found, err := c.GetOrLoadMany(ctx, ks, failing)
		if !errors.Is(err, boom) || !strings.HasPrefix(err.Error(), "imgcache: load 2 keys: ") {
			t.Errorf("err = %v, want the load's error, wrapped", err)
		}
		if got, want := etags(vals, found), []string{"-", `"1-v1"`, "-"}; !slices.Equal(got, want) {
			t.Errorf("GetOrLoadMany = %q, want %q: the cached key still answered", got, want)
		}
	}
	if n := calls.Load(); n != 2 {
		t.Errorf("failing loader called %d times, want 2 (errors are not cached)", n)
	}
	if s := c.Stats(); s.LoadErrors != 2 {
		t.Errorf("LoadErrors = %d, want 2", s.LoadErrors)
	}

	panicking := func(context.Context, []Key) (map[Key]ImageMeta, error) { panic("loader bug") }
	vals, found, err := c.GetOrLoadMany(ctx, ks, panicking)
	if err == nil || !strings.Contains(err.Error(), "panicked") || !found[1] || found[0] {
		t.Errorf("panicking loader: %q, %v", etags(vals, found), err)
	}

	// ErrNotFound: every key given to the loader is not found, and remembered so.
	notFound := func(context.Context, []Key) (map[Key]ImageMeta, error) {
		calls.Add(1)
		return nil, fmt.Errorf("no such artists: %w", ErrNotFound)
	}
	for range 2 {
		vals, found, err := c.GetOrLoadMany(ctx, ks, notFound)
		if err != nil {
			t.Errorf("err = %v, want nil for ErrNotFound", err)
		}
		if got, want := etags(vals, found), []string{"-", `"1-v1"`, "-"}; !slices.Equal(got, want) {
			t.Errorf("GetOrLoadMany = %q, want %q", got, want)
		}
	}
	if n := calls.Load(); n != 3 {
		t.Errorf("loader calls %d, want 3: the not-found keys are remembered", n)
	}
	// A nil map is "none found".
	z := NewKey("artist", "z")
	if _, found, err := c.GetOrLoadMany(ctx, []Key{z}, func(context.Context, []Key) (map[Key]ImageMeta, error) { return nil, nil }); err != nil || found[0] {
		t.Errorf("nil map: %v, %v", found, err)
	}
	if _, err := c.Get(ctx, z); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get of a key the loader left out: %v", err)
	}
}

// With StaleTTL, a failing batch load answers the keys that have a stale value, from L1 or Redis.
func TestGetOrLoadManyFailSafe(t *testing.T) {
	e := newEnv(t)
	o := e.opts()
	o.StaleTTL = time.Minute
	cs := instances(e, 2, o)
	a := cs[0]
	k, never := NewKey("artist", "fs"), NewKey("artist", "never")
	ttl := WithTTL(100 * time.Millisecond)
	l := &testLoader{have: func(k Key) bool { return k.ID() == "fs" }}
	if _, _, err := a.GetOrLoadMany(ctx, []Key{k, never}, l.load, ttl); err != nil {
		t.Fatal(err)
	}
	if err := a.Delete(ctx, never); err != nil { // not even a remembered "not found" is left
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	e.advance(150 * time.Millisecond)
	dbDown := errors.New("database is down")
	failing := func(context.Context, []Key) (map[Key]ImageMeta, error) { return nil, dbDown }
	for i, c := range cs { // a from its L1, b from Redis
		vals, found, err := c.GetOrLoadMany(ctx, []Key{k, never}, failing, ttl)
		if !errors.Is(err, dbDown) {
			t.Errorf("instance %d: err = %v, want the load's error for the key without a stale value", i, err)
		}
		if got, want := etags(vals, found), []string{`"fs-v1"`, "-"}; !slices.Equal(got, want) {
			t.Errorf("instance %d: GetOrLoadMany = %q, want %q", i, got, want)
		}
		if s := c.Stats(); s.StaleServed != 1 {
			t.Errorf("instance %d: StaleServed = %d, want 1", i, s.StaleServed)
		}
	}
}

// A caller whose context ends gets its error at once; the load goes on and is cached.
func TestGetOrLoadManyCallerLeaves(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	k := NewKey("artist", "slow")
	release := make(chan struct{})
	loaded := make(chan struct{})
	cctx, cancel := context.WithCancel(ctx)
	go func() {
		time.Sleep(10 * time.Millisecond)
		cancel()
	}()
	_, found, err := c.GetOrLoadMany(cctx, []Key{k}, func(context.Context, []Key) (map[Key]ImageMeta, error) {
		defer close(loaded)
		<-release
		return map[Key]ImageMeta{k: metaV("slow", 1)}, nil
	})
	if !errors.Is(err, context.Canceled) || found[0] {
		t.Errorf("GetOrLoadMany = %v, %v; want context.Canceled", found, err)
	}
	close(release)
	<-loaded
	eventually(t, wantETag(c, k, `"slow-v1"`))
}

// A batch load that was running when an invalidation happened may return its result, but no
// instance serves it afterwards (TestNoStaleResurrection for GetOrLoad).
func TestGetOrLoadManyNoStaleResurrection(t *testing.T) {
	kinds := map[string]func(c *Cache[ImageMeta], k Key) error{
		"Delete":            func(c *Cache[ImageMeta], k Key) error { return c.Delete(ctx, k) },
		"Set":               func(c *Cache[ImageMeta], k Key) error { return c.Set(ctx, k, metaV("3", 2)) },
		"InvalidateEntity":  func(c *Cache[ImageMeta], k Key) error { return c.InvalidateEntity(ctx, k.Entity(), k.ID()) },
		"InvalidateTags":    func(c *Cache[ImageMeta], k Key) error { return c.InvalidateTags(ctx, "artist:3") },
		"InvalidatePattern": func(c *Cache[ImageMeta], k Key) error { _, err := c.InvalidatePattern(ctx, "artist:3"); return err },
	}
	for name, invalidate := range kinds {
		for _, where := range []string{"same instance", "other instance"} {
			t.Run(name+"/"+where, func(t *testing.T) {
				e := newEnv(t)
				cs := instances(e, 3, e.opts())
				loader, invalidator, fresh := cs[0], cs[1], cs[2]
				if where == "same instance" {
					invalidator = loader
				}
				k := NewKey("artist", "3").With("type", "avatar")
				other := NewKey("artist", "4")
				started, release := make(chan struct{}), make(chan struct{})
				done := make(chan error, 1)
				go func() {
					vals, found, err := loader.GetOrLoadMany(ctx, []Key{k, other}, func(context.Context, []Key) (map[Key]ImageMeta, error) {
						close(started)
						<-release
						return map[Key]ImageMeta{k: metaV("3", 1), other: metaV("4", 1)}, nil // read before the invalidation
					}, WithTags("artist:3"))
					if err == nil && (!found[0] || vals[0].ETag != `"3-v1"`) {
						err = fmt.Errorf("got %q", etags(vals, found))
					}
					done <- err
				}()
				<-started
				if err := invalidate(invalidator, k); err != nil {
					t.Fatal(err)
				}
				close(release)
				if err := <-done; err != nil {
					t.Fatalf("the loader's caller: %v", err)
				}
				for i, c := range []*Cache[ImageMeta]{loader, invalidator, fresh} {
					eventually(t, func() error {
						v, err := c.Get(ctx, k)
						if name == "Set" {
							if err != nil || v.ETag != `"3-v2"` {
								return fmt.Errorf("instance %d: Get = %q, %v; want the Set's value", i, v.ETag, err)
							}
							return nil
						}
						if err := wantMiss(c, k)(); err != nil {
							return fmt.Errorf("instance %d serves the stale load: %w", i, err)
						}
						return nil
					})
				}
			})
		}
	}
}

// An invalidation that reaches an instance while its batch read is in flight keeps the read's
// values out of its L1.
func TestGetManyReadInFlightDuringInvalidationDoesNotFillL1(t *testing.T) {
	e := newNodeEnv(t) // holds the MGET that only a single node's batch sends
	k := NewKey("artist", "4").With("type", "avatar")
	other := NewKey("artist", "5")
	hook := newHold("mget", e.redisKey(k), true) // after the reply, before the cache sees it
	writer := newCache[ImageMeta](e, e.opts())
	o := e.opts()
	o.Redis = heldClient(t, e, hook)
	o.L2Timeout = 5 * time.Second
	reader := newCache[ImageMeta](e, o)
	for _, k := range []Key{k, other} {
		if err := writer.Set(ctx, k, metaV(k.ID(), 1)); err != nil {
			t.Fatal(err)
		}
	}
	// The Sets' messages drop the keys' L1 fills that began before them: wait for them first.
	eventually(t, func() error {
		if reader.Stats().BusReceived != 2 {
			return errors.New("the reader has not received the Sets' messages")
		}
		return nil
	})
	got := make(chan []string, 1)
	go func() {
		vals, found, _ := reader.GetMany(ctx, []Key{k, other})
		got <- etags(vals, found)
	}()
	<-hook.held
	if err := writer.InvalidateEntity(ctx, "artist", "4"); err != nil {
		t.Fatal(err)
	}
	eventually(t, func() error {
		if reader.Stats().BusReceived != 3 {
			return errors.New("the reader has not received the invalidation")
		}
		return nil
	})
	close(hook.release)
	<-got // the read may return what it read
	if _, err := reader.Get(ctx, k); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after the invalidation: %v, want ErrNotFound", err)
	}
	if s := reader.Stats(); s.L1Entries != 1 {
		t.Errorf("L1 holds %d entries, want only the unaffected key's: %+v", s.L1Entries, s)
	}
}

// Close cancels a batch load in flight and waits for it.
func TestCloseDuringGetOrLoadMany(t *testing.T) {
	e := newEnv(t)
	c, err := New[ImageMeta](e.opts())
	if err != nil {
		t.Fatal(err)
	}
	entered := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		cctx, cancel := context.WithCancel(ctx)
		defer cancel()
		_, _, err := c.GetOrLoadMany(cctx, []Key{NewKey("artist", "1")}, func(ctx context.Context, _ []Key) (map[Key]ImageMeta, error) {
			close(entered)
			<-ctx.Done()
			return nil, ctx.Err()
		})
		done <- err
	}()
	<-entered
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("GetOrLoadMany during Close: %v, want the load's context.Canceled", err)
	}
}

// BenchmarkGetManyL2 reads 100 keys that are all in Redis (L1 off) with one GetMany, beside the
// floor: a go-redis MGET of the same 100 keys and a decode of each value with the same codec. A
// second floor adds to the MGET the entities' generation keys that GetMany reads with the values
// (100 here, one per key: the worst case), and the "10-entities" rows read 100 keys of 10
// entities, 10 variants each (10 generation keys). ns/key is a batch's time over 100.
//
//	IMGCACHE_REDIS_ADDR=127.0.0.1:6379 go test -run '^$' -bench GetMany -benchmem -count 6 .
func BenchmarkGetManyL2(b *testing.B) {
	const n = 100
	distinctKeys, _ := benchKeySet()
	distinctKeys = distinctKeys[:n]
	var sharedKeys []Key // 10 artists, 10 sizes each
	for i := range n {
		sharedKeys = append(sharedKeys, NewKey("artist", fmt.Sprint(i/10)).With("type", "avatar").With("size", fmt.Sprint(64*(1+i%10))))
	}
	for name, e := range benchBackends(b) {
		o := e.opts()
		o.L1Size = -1
		c := newCache[ImageMeta](e, o)
		for _, k := range append(distinctKeys, sharedKeys...) {
			if err := c.Set(ctx, k, sampleMeta(k.ID())); err != nil {
				b.Fatal(err)
			}
		}
		perKey := func(b *testing.B) {
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/key")
		}
		getMany := func(keys []Key) func(b *testing.B) {
			return func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					vals, found, err := c.GetMany(ctx, keys)
					if err != nil || !found[n-1] || vals[n-1].Size == 0 {
						b.Fatal("miss", err)
					}
				}
				perKey(b)
			}
		}
		// mget is the floor: one MGET of rkeys, of which the first n are values, and a decode of
		// each value.
		mget := func(rkeys []string) func(b *testing.B) {
			return func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					res, err := e.rdb.MGet(ctx, rkeys...).Result()
					if err != nil {
						b.Fatal(err)
					}
					vals := make([]ImageMeta, n)
					for i, r := range res[:n] {
						s, ok := r.(string)
						if !ok {
							b.Fatal("miss")
						}
						env, err := decodeEnvelope([]byte(s), c.codecID, c.maxValue)
						if err != nil {
							b.Fatal(err)
						}
						if err := vals[i].UnmarshalBinary(env.payload); err != nil {
							b.Fatal(err)
						}
					}
				}
				perKey(b)
			}
		}
		redisKeys := func(keys []Key, gens bool) []string {
			var out []string
			for _, k := range keys {
				out = append(out, e.redisKey(k))
			}
			if gens {
				for _, k := range keys {
					out = append(out, c.l2.entityGen(k.Entity(), k.ID()))
				}
			}
			return out
		}
		b.Run("imgcache/"+name, getMany(distinctKeys))
		b.Run("go-redis-MGET+decode/"+name, mget(redisKeys(distinctKeys, false)))
		b.Run("go-redis-MGET+generations+decode/"+name, mget(redisKeys(distinctKeys, true)))
		b.Run("imgcache-10-entities/"+name, getMany(sharedKeys))
		b.Run("go-redis-MGET+decode-10-entities/"+name, mget(redisKeys(sharedKeys, false)))
	}
}

// TestGetOrLoadManySoftTimeout: past SoftLoadTimeout, the keys of a batch that have a stale value
// get it while the load goes on, and the load's values are stored when it ends; a key invalidated
// meanwhile gets no stale value, and a key without one waits for the load.
func TestGetOrLoadManySoftTimeout(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.StaleTTL = time.Minute
	opts.SoftLoadTimeout = 50 * time.Millisecond
	c := newCache[ImageMeta](e, opts)
	a, b, d, n := NewKey("artist", "sa"), NewKey("artist", "sb"), NewKey("artist", "sd"), NewKey("artist", "sn")
	short := WithTTL(100 * time.Millisecond)
	loadV := func(version int) func(context.Context, []Key) (map[Key]ImageMeta, error) {
		return func(_ context.Context, ks []Key) (map[Key]ImageMeta, error) {
			m := make(map[Key]ImageMeta, len(ks))
			for _, k := range ks {
				m[k] = metaV(k.String(), version)
			}
			return m, nil
		}
	}
	if _, _, err := c.GetOrLoadMany(ctx, []Key{a, b, d}, loadV(1), short); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	e.advance(150 * time.Millisecond)

	// Every key stale: the stale values after the soft timeout, the new ones stored later. The
	// caller's context cannot end, so before soft timeouts it ran the load itself.
	started, release := make(chan struct{}), make(chan struct{})
	slow := func(ctx context.Context, ks []Key) (map[Key]ImageMeta, error) {
		close(started)
		select { // bounded: a regression fails the test rather than hanging it
		case <-release:
		case <-time.After(2 * time.Second):
		}
		return loadV(2)(ctx, ks)
	}
	start := time.Now()
	vals, found, err := c.GetOrLoadMany(context.Background(), []Key{a, b}, slow, WithTTL(time.Minute))
	if took := time.Since(start); err != nil || !found[0] || !found[1] || vals[0].ETag != metaV(a.String(), 1).ETag ||
		vals[1].ETag != metaV(b.String(), 1).ETag || took > 500*time.Millisecond {
		t.Fatalf("past the soft timeout: %v %v %v after %v; want both stale values after about 50ms", vals, found, err, took)
	}
	<-started
	// The timer's callback counts the refresh once it has published: just after the call returns.
	eventually(t, func() error {
		if s := c.Stats(); s.StaleServed != 2 || s.Refreshes != 1 {
			return fmt.Errorf("StaleServed, Refreshes = %d, %d; want 2, 1", s.StaleServed, s.Refreshes)
		}
		return nil
	})
	close(release)
	eventually(t, wantETag(c, a, metaV(a.String(), 2).ETag))
	eventually(t, wantETag(c, b, metaV(b.String(), 2).ETag))

	// d stale but deleted during the load, n never loaded: both wait for the load; a, b are fresh.
	time.Sleep(10 * time.Millisecond)
	started, release = make(chan struct{}), make(chan struct{})
	type result struct {
		vals  []ImageMeta
		found []bool
		err   error
	}
	done := make(chan result, 1)
	go func() {
		vals, found, err := c.GetOrLoadMany(ctx, []Key{d, n}, slow)
		done <- result{vals, found, err}
	}()
	<-started
	if err := c.Delete(ctx, d); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		t.Fatalf("GetOrLoadMany returned before its load ended: %+v", r)
	case <-time.After(150 * time.Millisecond):
	}
	close(release)
	r := <-done
	if r.err != nil || !r.found[0] || !r.found[1] || r.vals[0].ETag != metaV(d.String(), 2).ETag || r.vals[1].ETag != metaV(n.String(), 2).ETag {
		t.Errorf("after the load: %+v; want the loaded values (no stale value for the deleted key)", r)
	}
}

// BenchmarkGetOrLoadManyMiss loads 100 keys that neither level has (new ones in every batch, one
// entity each) with one GetOrLoadMany and a loader that answers at once: the cost of a batch
// miss's three round trips, its registrations, leases and verified writes. ns/key is a batch's time
// over 100.
//
//	IMGCACHE_REDIS_ADDR=127.0.0.1:6379 go test -run '^$' -bench GetOrLoadManyMiss -benchmem -count 6 .
func BenchmarkGetOrLoadManyMiss(b *testing.B) {
	const n = 100
	load := func(_ context.Context, ks []Key) (map[Key]ImageMeta, error) {
		m := make(map[Key]ImageMeta, len(ks))
		for _, k := range ks {
			m[k] = sampleMeta(k.ID())
		}
		return m, nil
	}
	for name, e := range benchBackends(b) {
		c := newCache[ImageMeta](e, e.opts())
		var next int
		b.Run("imgcache/"+name, func(b *testing.B) {
			b.ReportAllocs()
			keys := make([]Key, n)
			for b.Loop() {
				b.StopTimer()
				for i := range keys {
					next++
					keys[i] = NewKey("cover", fmt.Sprint(next)).With("size", "512")
				}
				b.StartTimer()
				if _, found, err := c.GetOrLoadMany(ctx, keys, load); err != nil || !found[n-1] {
					b.Fatal("not loaded", err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/key")
		})
	}
}
