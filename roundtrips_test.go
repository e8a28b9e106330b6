package imgcache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"
)

// calls returns rt's calls since the last take, without a new connection's handshake.
func calls(rt *roundTrips) []string {
	_, cs := rt.take()
	names, _ := withoutHandshakes(cs)
	return names
}

// withoutHandshakes returns calls (as roundTrips.take returns them) without a new connection's
// handshake, and their names.
func withoutHandshakes(calls [][][]any) (names []string, kept [][][]any) {
	for _, call := range calls {
		var n []string
		for _, args := range call {
			n = append(n, strings.ToLower(fmt.Sprint(args[0])))
		}
		name := strings.Join(n, " ")
		if name == "hello" || strings.HasPrefix(name, "client") {
			continue
		}
		names, kept = append(names, name), append(kept, call)
	}
	return names, kept
}

// A GetOrLoad that Redis answers costs what a Get costs: one GET (the miss's registration read the
// entity's generation, which this instance trusts from then on), no script. A miss costs three
// round trips on a single Redis: the read, the registration with the lease, and the write with its
// check and the lease's release.
func TestGetOrLoadRoundTrips(t *testing.T) {
	e := newNodeEnv(t) // counts a single node's round trips
	o := e.opts()
	o.L1Size = -1 // every call reads Redis
	c, rt := countedCache(t, e, o)
	k := NewKey("artist", "rt").With("size", "512")
	loads := 0
	load := func(context.Context) (ImageMeta, error) { loads++; return metaV("rt", 1), nil }

	rt.take()
	if _, err := c.GetOrLoad(ctx, k, load); err != nil {
		t.Fatal(err)
	}
	names := calls(rt)
	want := []string{"mget", "mget mget evalsha set", "set hget evalsha mget"}
	if !slices.Equal(names, want) {
		t.Errorf("a miss made the calls %q, want %q", names, want)
	}
	if n := e.rdb.Exists(ctx, c.leaseKey(k)).Val(); n != 0 {
		t.Error("the load's lease is still held after its write")
	}

	for range 3 {
		v, err := c.GetOrLoad(ctx, k, load)
		if err != nil || v.ETag != `"rt-v1"` {
			t.Fatalf("GetOrLoad = %s, %v", v.ETag, err)
		}
	}
	if names := calls(rt); !slices.Equal(names, []string{"get", "get", "get"}) {
		t.Errorf("three hits in Redis made the calls %q, want one GET each", names)
	}
	if loads != 1 {
		t.Errorf("%d loads, want 1", loads)
	}
	if s := c.Stats(); s.L2Hits != 3 || s.Misses != 1 {
		t.Errorf("L2Hits %d, Misses %d; want 3 and 1", s.L2Hits, s.Misses)
	}
}

// While most of GetOrLoad's reads of Redis miss, a miss skips the plain read: its registration
// reads the value, and the miss costs two round trips instead of three. Once values are found
// again, a hit costs the registration and the lease's release for a few calls, and then one GET
// again. Every value is still loaded once and found where it is.
func TestGetOrLoadSpeculatesWhileMissesDominate(t *testing.T) {
	e := newNodeEnv(t) // counts a single node's round trips
	o := e.opts()
	o.L1Size = -1 // every call reads Redis
	c, rt := countedCache(t, e, o)
	loads := 0
	load := func(_ context.Context, id string) func(context.Context) (ImageMeta, error) {
		return func(context.Context) (ImageMeta, error) { loads++; return metaV(id, 1), nil }
	}
	key := func(i int) Key { return NewKey("artist", fmt.Sprint("spec", i)) }
	getOrLoad := func(i int) []string {
		t.Helper()
		rt.take()
		v, err := c.GetOrLoad(ctx, key(i), load(ctx, fmt.Sprint("spec", i)))
		if err != nil || v.ETag != fmt.Sprintf(`"spec%d-v1"`, i) {
			t.Fatalf("GetOrLoad(%d) = %s, %v", i, v.ETag, err)
		}
		return calls(rt)
	}

	var trips []int // round trips of each miss
	for i := range 10 {
		trips = append(trips, len(getOrLoad(i)))
	}
	// The sixth miss takes the average of misses past one half (1 - (7/8)^6 = 0.55).
	if want := []int{3, 3, 3, 3, 3, 3, 2, 2, 2, 2}; !slices.Equal(trips, want) {
		t.Errorf("ten misses took %v round trips, want %v", trips, want)
	}
	if names := getOrLoad(10); !slices.Equal(names, []string{"mget mget evalsha set", "set hget evalsha mget"}) {
		t.Errorf("a miss while misses dominate made the calls %q", names)
	}
	if loads != 11 {
		t.Errorf("%d loads for 11 misses", loads)
	}

	// Hits now. After eleven misses the moving average stands at 0.77; the first four hits, made
	// through the registration, bring it under one half.
	trips = trips[:0]
	for i := range 8 {
		names := getOrLoad(i)
		trips = append(trips, len(names))
		if len(names) == 2 && names[1] != "evalsha" {
			t.Errorf("a speculative hit made the calls %q, want the lease's release second", names)
		}
	}
	if want := []int{2, 2, 2, 2, 1, 1, 1, 1}; !slices.Equal(trips, want) {
		t.Errorf("eight hits took %v round trips, want %v", trips, want)
	}
	if loads != 11 {
		t.Errorf("%d loads, want 11: a hit loaded", loads)
	}
	for i := range 8 {
		if n := e.rdb.Exists(ctx, c.leaseKey(key(i))).Val(); n != 0 {
			t.Errorf("key %d: a lease is still held", i)
		}
	}
	if s := c.Stats(); s.L2Hits != 8 || s.Misses != 11 {
		t.Errorf("L2Hits %d, Misses %d; want 8 and 11", s.L2Hits, s.Misses)
	}
}

// A speculating flight whose registration Redis refuses (here the pattern epoch cannot be read; in
// production a script refused at maxmemory) still serves the value Redis holds, as a flight that
// read first does, and loads nothing; and the reads it falls back on move the average back.
func TestSpeculatingFlightReadsWhenRegistrationIsRefused(t *testing.T) {
	for _, speculating := range []bool{false, true} {
		t.Run(fmt.Sprint("speculating=", speculating), func(t *testing.T) {
			e := newEnv(t)
			o := e.opts()
			o.L1Size = -1 // every call reads Redis
			c := newCache[ImageMeta](e, o)
			k := NewKey("artist", "refused")
			if err := c.Set(ctx, k, metaV("refused", 1)); err != nil {
				t.Fatal(err)
			}
			epoch := c.l2.epochKey() // a hash now: every registration's GET of it fails (WRONGTYPE)
			if err := e.rdb.Del(ctx, epoch).Err(); err != nil {
				t.Fatal(err)
			}
			if err := e.rdb.HSet(ctx, epoch, "x", "y").Err(); err != nil {
				t.Fatal(err)
			}
			if speculating {
				c.l2Misses.Store(1 << 16)
			}
			loads := 0
			for range 6 { // six hits take the average from 1 to under one half
				v, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
					loads++
					return ImageMeta{}, errors.New("database down")
				})
				if err != nil || v.ETag != `"refused-v1"` {
					t.Fatalf("GetOrLoad = %s, %v; want the value in Redis", v.ETag, err)
				}
			}
			if loads != 0 {
				t.Errorf("%d loads of a value Redis holds", loads)
			}
			if s := c.Stats(); s.L2Hits != 6 {
				t.Errorf("L2Hits %d, want 6", s.L2Hits)
			}
			if speculating && c.speculate() {
				t.Error("six hits left the flights speculating")
			}
			if n := e.rdb.Exists(ctx, c.leaseKey(k)).Val(); n != 0 {
				t.Error("a lease is still held")
			}
		})
	}
}

// A speculating flight's read is logged as every read of Redis is.
func TestSpeculativeReadIsLogged(t *testing.T) {
	e := newEnv(t)
	o := e.opts()
	logged := captureLog(&o, slog.LevelDebug)
	c := newCache[ImageMeta](e, o)
	c.l2Misses.Store(1 << 16)
	hit, miss := NewKey("artist", "logged"), NewKey("artist", "absent")
	if err := c.Set(ctx, hit, metaV("logged", 1)); err != nil {
		t.Fatal(err)
	}
	c.l1.remove(hit)
	for _, k := range []Key{hit, miss} {
		if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("absent", 1), nil }); err != nil {
			t.Fatal(err)
		}
	}
	out := logged()
	for _, want := range []string{
		`msg="imgcache L2 GET" key=` + e.redisKey(hit) + " result=HIT",
		`msg="imgcache L2 GET" key=` + e.redisKey(miss) + " result=MISS",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the log lacks %q:\n%s", want, out)
		}
	}
}

// On a Cluster (a one-shard Ring, and the real Cluster in the cluster run) the lease cannot be
// released in the write's pipeline, whose keys live on other nodes: the load releases it after its
// write and check.
func TestGetOrLoadReleasesItsLeaseOnACluster(t *testing.T) {
	for _, wp := range writePaths[1:] {
		t.Run(wp.name, func(t *testing.T) {
			e := wp.env(t)
			rt := &roundTrips{}
			o := e.opts()
			o.Redis = wp.client(t, e, rt)
			c := newCache[ImageMeta](e, o)
			k := NewKey("artist", "ring")
			rt.take()
			if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("ring", 1), nil }); err != nil {
				t.Fatal(err)
			}
			names := calls(rt)
			if len(names) == 0 || names[len(names)-1] != "evalsha" {
				t.Errorf("calls %q: want the lease's release last", names)
			}
			if n := e.rdb.Exists(ctx, c.leaseKey(k)).Val(); n != 0 {
				t.Error("the load's lease is still held")
			}
			if e.raw(k) == "" {
				t.Error("the loaded value is not in Redis")
			}
		})
	}
}

// A Redis whose script cache was emptied (a restart, SCRIPT FLUSH) answers NOSCRIPT to the
// EVALSHAs of the hot paths; they are sent again as EVAL, and nothing is lost.
func TestScriptsSurviveAnEmptiedScriptCache(t *testing.T) {
	e := newNodeEnv(t) // counts a single node's round trips
	o := e.opts()
	c, rt := countedCache(t, e, o)
	other := newCache[ImageMeta](e, e.opts())
	flush := func() {
		t.Helper()
		if err := e.rdb.ScriptFlush(ctx).Err(); err != nil {
			t.Fatal(err)
		}
	}

	flush()
	k := NewKey("artist", "flushed")
	rt.take()
	if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("flushed", 1), nil }); err != nil {
		t.Fatal(err)
	}
	names := calls(rt)
	if !slices.Contains(names, "eval") {
		t.Errorf("calls %q: want the registration sent again as EVAL", names)
	}
	if e.raw(k) == "" {
		t.Fatal("the loaded value is not in Redis")
	}
	if n := e.rdb.Exists(ctx, c.leaseKey(k)).Val(); n != 0 {
		t.Error("the load's lease is still held")
	}
	// The value carries a valid stamp: another instance reads it, and an invalidation of its
	// entity still reaches it.
	v, err := other.Get(ctx, k)
	if err != nil || v.ETag != `"flushed-v1"` {
		t.Fatalf("other.Get = %s, %v", v.ETag, err)
	}

	flush()
	if err := c.Set(ctx, k, metaV("flushed", 2)); err != nil {
		t.Fatalf("Set after SCRIPT FLUSH: %v", err)
	}
	flush()
	if err := c.InvalidateEntity(ctx, "artist", "flushed"); err != nil {
		t.Fatal(err)
	}
	if e.raw(k) != "" {
		t.Error("the value survived the invalidation of its entity in Redis")
	}
	eventually(t, wantMiss(other, k)) // the other instance's L1 hears of it by the bus
	if n := c.Stats().L2Errors; n != 0 {
		t.Errorf("L2Errors = %d, want 0: NOSCRIPT is not a failure", n)
	}
}

// A NOSCRIPT reply counts as Redis answering, not failing: the breaker stays closed.
func TestNoScriptRetryKeepsTheBreakerClosed(t *testing.T) {
	e := newEnv(t)
	o := e.opts()
	o.BreakerThreshold = 1
	c := newCache[ImageMeta](e, o)
	for i := range 3 {
		if err := e.rdb.ScriptFlush(ctx).Err(); err != nil {
			t.Fatal(err)
		}
		k := NewKey("artist", "brk").With("n", string(rune('a'+i)))
		if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("brk", 1), nil }); err != nil {
			t.Fatal(err)
		}
	}
	if c.l2.brk.open() {
		t.Error("NOSCRIPT replies opened the breaker")
	}
}

// A lease that nobody will release (its holder died, or the reply of its release was lost) and
// that Redis does not expire (miniredis's clock stands still) holds a load back for LockTTL, not
// for ever.
func TestOrphanedLeaseHoldsLoadsBackForLockTTLAtMost(t *testing.T) {
	e := newMiniEnv(t)
	o := e.opts()
	o.LockTTL = 100 * time.Millisecond
	c := newCache[ImageMeta](e, o)
	k := NewKey("artist", "orphan")
	if err := e.rdb.Set(ctx, c.leaseKey(k), "someone-else", 0).Err(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	v, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("orphan", 1), nil })
	if err != nil || v.ETag != `"orphan-v1"` {
		t.Fatalf("GetOrLoad = %s, %v", v.ETag, err)
	}
	if d := time.Since(start); d < o.LockTTL || d > 2*time.Second {
		t.Errorf("GetOrLoad took %v, want about LockTTL (%v)", d, o.LockTTL)
	}
}

// A flight whose lease SET was retried after a lost reply finds the lease holding its own token:
// it is the holder, and loads, instead of waiting on itself.
func TestLeaseHeldByOwnTokenIsTheFlights(t *testing.T) {
	e := newEnv(t)
	o := e.opts()
	o.LockTTL = time.Minute // a wait on itself would outlast the test
	c := newCache[ImageMeta](e, o)
	k := NewKey("artist", "own")
	const token = "0123456789abcdef"
	if err := e.rdb.Set(ctx, c.leaseKey(k), token, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	giveUp := time.Now().Add(time.Minute)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, found, mine, err := c.awaitLease(ctx, k, c.inv.of(k), token, giveUp)
		if !mine || found || err != nil {
			t.Errorf("awaitLease = found %v, mine %v, %v; want mine", found, mine, err)
		}
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the flight waited on its own lease")
	}
}
