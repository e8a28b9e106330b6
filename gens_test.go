package imgcache

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/cespare/xxhash/v2"
	"github.com/redis/go-redis/v9"
)

// A read that trusts its entity's generation reads the value alone: the first read of an entity is
// an MGET of the value and its generation key, later reads a GET, whatever the key's parameters.
// With GenerationTTL negative every read is an MGET.
func TestTrustedGenerationReadsTheValueAlone(t *testing.T) {
	e := newNodeEnv(t) // counts the commands of a single node's reads
	writer := newCache[ImageMeta](e, e.opts())
	k1 := NewKey("artist", "alone").With("size", "1")
	k2 := NewKey("artist", "alone").With("size", "2")
	for _, k := range []Key{k1, k2} {
		if err := writer.Set(ctx, k, metaV("alone", 1)); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name   string
		genTTL time.Duration
		want   []string
	}{
		{"trusted", 0, []string{"mget", "get", "get"}},
		{"untrusted", -1, []string{"mget", "mget", "mget"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := e.opts()
			o.L1Size = -1 // every Get reads Redis
			o.GenerationTTL = tc.genTTL
			c, rt := countedCache(t, e, o)
			rt.take()
			for _, k := range []Key{k1, k2, k1} {
				if v, err := c.Get(ctx, k); err != nil || v.ETag != `"alone-v1"` {
					t.Fatalf("Get(%v) = %s, %v", k, v.ETag, err)
				}
			}
			if names := calls(rt); !slices.Equal(names, tc.want) {
				t.Errorf("three reads of one entity made the calls %q, want %q", names, tc.want)
			}
		})
	}
}

// An invalidation reaches the generations an instance trusts as it reaches L1: on the instance
// that runs it at once, on the others through the bus. A value written under the old generation
// after the invalidation (as by a load that was in flight) is then not served.
func TestInvalidationReachesTrustedGenerations(t *testing.T) {
	for _, tc := range []struct {
		name       string
		invalidate func(c *Cache[ImageMeta]) error
	}{
		{"entity", func(c *Cache[ImageMeta]) error { return c.InvalidateEntity(ctx, "artist", "trust") }},
		{"tag", func(c *Cache[ImageMeta]) error { return c.InvalidateTags(ctx, "album:trust") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			o := e.opts()
			o.L1Size = -1 // every Get reads Redis: only the generations are remembered
			cs := instances(e, 2, o)
			a, b := cs[0], cs[1]
			k := NewKey("artist", "trust").With("size", "64")
			if err := a.Set(ctx, k, metaV("trust", 1), WithTags("album:trust")); err != nil {
				t.Fatal(err)
			}
			heard(t, b, 1)
			for _, c := range cs {
				if _, err := c.Get(ctx, k); err != nil {
					t.Fatal(err)
				}
				if _, ok := c.trustedGen("artist\x00trust"); !ok {
					t.Fatal("the entity's generation is not trusted after a read")
				}
				if _, ok := c.trustedGen("album:trust"); !ok {
					t.Fatal("the tag's generation is not trusted after a read")
				}
			}
			old := e.raw(k)
			restore := func() {
				t.Helper()
				if err := e.rdb.Set(ctx, e.redisKey(k), old, time.Minute).Err(); err != nil {
					t.Fatal(err)
				}
			}
			if err := tc.invalidate(a); err != nil {
				t.Fatal(err)
			}
			restore()
			if err := wantMiss(a, k)(); err != nil {
				t.Errorf("the invalidating instance: %v", err)
			}
			restore()
			eventually(t, wantMiss(b, k))
			for _, c := range cs {
				if n := c.Stats().L2Stale; n != 1 {
					t.Errorf("L2Stale = %d, want 1", n)
				}
			}
		})
	}
}

// A value written under a generation newer than the one this instance trusts (the invalidation's
// message has not arrived) is read again with its generation key and served; the new generation is
// trusted from then on. Nothing counts as stale.
func TestStampNewerThanTrustedGenerationIsReadAgain(t *testing.T) {
	e := newNodeEnv(t) // counts the commands of a single node's reads
	o := e.opts()
	o.L1Size = -1
	c, rt := countedCache(t, e, o)
	k := NewKey("artist", "newer")
	if err := c.Set(ctx, k, metaV("newer", 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, k); err != nil {
		t.Fatal(err)
	}
	// Another instance's invalidation, unheard: the generation moves in Redis only.
	if err := e.rdb.HIncrBy(ctx, c.l2.entityMeta("artist", "newer"), "g", 1).Err(); err != nil {
		t.Fatal(err)
	}
	if err := e.rdb.Incr(ctx, c.l2.entityGen("artist", "newer")).Err(); err != nil {
		t.Fatal(err)
	}
	other := newCache[ImageMeta](e, e.opts())
	if err := other.Set(ctx, k, metaV("newer", 2)); err != nil {
		t.Fatal(err)
	}
	// The Set's own message moves k's invalidation sequence; a read it overtook would not trust
	// what it read, so let it arrive first.
	heard(t, c, 1)
	rt.take()
	for range 2 {
		if err := wantETag(c, k, `"newer-v2"`)(); err != nil {
			t.Fatal(err)
		}
	}
	if names := calls(rt); !slices.Equal(names, []string{"get", "mget", "get"}) {
		t.Errorf("calls %q, want a GET, the MGET that reads the generation, then a GET", names)
	}
	if s := c.Stats(); s.L2Stale != 0 || s.L2Hits != 3 {
		t.Errorf("L2Stale %d, L2Hits %d; want 0 and 3", s.L2Stale, s.L2Hits)
	}
}

// GetMany leaves trusted generations out of its MGET, and reads a value whose stamp differs from a
// trusted generation again, in one more MGET with the generation key.
func TestGetManyTrustsGenerations(t *testing.T) {
	e := newNodeEnv(t) // counts the commands of a single node's reads
	o := e.opts()
	o.L1Size = -1
	c, rt := countedCache(t, e, o)
	ks := []Key{NewKey("artist", "m1"), NewKey("artist", "m2"), NewKey("artist", "m3")}
	writer := newCache[ImageMeta](e, e.opts())
	for _, k := range ks {
		if err := writer.Set(ctx, k, metaV(k.ID(), 1)); err != nil {
			t.Fatal(err)
		}
	}
	heard(t, c, 3)
	mgetSizes := func() []int {
		_, cs := rt.take()
		var n []int
		for _, call := range cs {
			for _, args := range call {
				if fmt.Sprint(args[0]) == "mget" {
					n = append(n, len(args)-1)
				}
			}
		}
		return n
	}

	rt.take()
	wantGetMany(t, c, ks, `"m1-v1"`, `"m2-v1"`, `"m3-v1"`)
	wantGetMany(t, c, ks, `"m1-v1"`, `"m2-v1"`, `"m3-v1"`)
	if got, want := mgetSizes(), []int{6, 3}; !slices.Equal(got, want) {
		t.Errorf("MGETs of %v keys, want %v: values and generations, then the values alone", got, want)
	}

	// m2's generation moves behind this instance's back, and m2 is written under it.
	if err := e.rdb.HIncrBy(ctx, c.l2.entityMeta("artist", "m2"), "g", 1).Err(); err != nil {
		t.Fatal(err)
	}
	if err := e.rdb.Incr(ctx, c.l2.entityGen("artist", "m2")).Err(); err != nil {
		t.Fatal(err)
	}
	if err := writer.Set(ctx, ks[1], metaV("m2", 2)); err != nil {
		t.Fatal(err)
	}
	heard(t, c, 4)
	rt.take()
	wantGetMany(t, c, ks, `"m1-v1"`, `"m2-v2"`, `"m3-v1"`)
	if got, want := mgetSizes(), []int{3, 2}; !slices.Equal(got, want) {
		t.Errorf("MGETs of %v keys, want %v: the values, then m2 again with its generation", got, want)
	}
	if s := c.Stats(); s.L2Stale != 0 {
		t.Errorf("L2Stale = %d, want 0", s.L2Stale)
	}
}

// A resubscription forgets every trusted generation, as it flushes L1: messages may have been lost.
func TestResubscriptionForgetsTrustedGenerations(t *testing.T) {
	e := namedEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	k := NewKey("artist", "resub")
	if err := c.Set(ctx, k, metaV("resub", 1)); err != nil {
		t.Fatal(err)
	}
	if _, ok := c.trustedGen("artist\x00resub"); !ok {
		t.Fatal("the entity's generation is not trusted after a Set")
	}
	e.killPubSub(t)
	eventually(t, func() error {
		if s := c.Stats(); s.BusResubscribes < 1 {
			return fmt.Errorf("no resubscription yet: %+v", s)
		}
		return nil
	})
	if _, ok := c.trustedGen("artist\x00resub"); ok {
		t.Error("a generation is still trusted after a resubscription")
	}
}

// A generation is trusted for GenerationTTL at most: then a read reads it again.
func TestGenerationTTLBoundsTheTrust(t *testing.T) {
	e := newNodeEnv(t) // counts the commands of a single node's reads
	o := e.opts()
	o.L1Size = -1
	o.GenerationTTL = 20 * time.Millisecond
	c, rt := countedCache(t, e, o)
	k := NewKey("artist", "ttl")
	if err := c.Set(ctx, k, metaV("ttl", 1)); err != nil {
		t.Fatal(err)
	}
	rt.take()
	if _, err := c.Get(ctx, k); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * o.GenerationTTL)
	if _, err := c.Get(ctx, k); err != nil {
		t.Fatal(err)
	}
	if names := calls(rt); !slices.Equal(names, []string{"get", "mget"}) {
		t.Errorf("calls %q, want a GET within GenerationTTL of the Set and an MGET after it", names)
	}
}

// A generation read before an invalidation is never trusted after it, and the holder stays bounded.
func TestTrustedGensPutIfAndBound(t *testing.T) {
	acquireClock()
	defer releaseClock()
	g := newTrustedGens(100, int64(time.Minute))
	var inv invalidations
	get := func(name string) (uint64, bool) { return g.get(name, xxhash.Sum64String(name)) }
	g.putIf("artist\x00a", 7, 0, &inv)
	if v, ok := get("artist\x00a"); !ok || v != 7 {
		t.Fatalf("get = %d, %v; want 7, true", v, ok)
	}
	inv.all() // an invalidation between the read and the fill
	g.putIf("artist\x00b", 8, 0, &inv)
	if _, ok := get("artist\x00b"); ok {
		t.Error("a generation read before an invalidation was trusted")
	}
	g.forget("artist\x00a")
	if _, ok := get("artist\x00a"); ok {
		t.Error("a forgotten generation is still trusted")
	}
	for i := range 10_000 {
		g.putIf(fmt.Sprint("tag", i), uint64(i), 1, &inv)
	}
	if n, limit := g.len(), len(g.buckets)*genWays; n > limit {
		t.Errorf("%d generations held, want at most %d", n, limit)
	}
	g.forgetAll()
	if _, ok := get("tag9999"); ok {
		t.Error("forgetAll left a generation trusted")
	}
	if n := g.len(); n != 0 {
		t.Errorf("%d generations trusted after forgetAll, want 0", n)
	}
	g.putIf("tag9999", 3, 1, &inv)
	if v, ok := get("tag9999"); !ok || v != 3 {
		t.Errorf("after forgetAll, a new fill reads %d, %v; want 3, true", v, ok)
	}
}

// A record holds a name of up to shortName bytes itself and a longer one as a string: names on
// either side of the bound, and names that share a prefix with them, each find their own record.
func TestTrustedGensShortAndLongNames(t *testing.T) {
	acquireClock()
	defer releaseClock()
	if size := unsafe.Sizeof(trustedGen{}); size != 64 {
		t.Errorf("a trustedGen is %d bytes, want 64 (one cache line)", size)
	}
	g := newTrustedGens(100, int64(time.Minute))
	var inv invalidations
	get := func(name string) (uint64, bool) { return g.get(name, xxhash.Sum64String(name)) }
	names := []string{
		"a\x001",
		"artist\x00" + strings.Repeat("7", shortName-len("artist\x00")),   // fits exactly
		"artist\x00" + strings.Repeat("7", shortName-len("artist\x00")+1), // one byte too long
		"album\x00" + strings.Repeat("f", 64),
	}
	for i, n := range names {
		g.putIf(n, uint64(100+i), 0, &inv)
	}
	for i, n := range names {
		if v, ok := get(n); !ok || v != uint64(100+i) {
			t.Errorf("get(%q) = %d, %v; want %d, true", n, v, ok, 100+i)
		}
		// The name cut short by a byte, or one byte longer, is another name.
		for _, other := range []string{n[:len(n)-1], n + "7"} {
			if r := g.find(xxhash.Sum64String(n)); r != nil && r.is(other) {
				t.Errorf("the record of %q is also %q's", n, other)
			}
		}
	}
	g.forget(names[2], names[3])
	for _, n := range names[2:] {
		if _, ok := get(n); ok {
			t.Errorf("%q is still trusted after forget", n)
		}
	}
	if _, ok := get(names[1]); !ok {
		t.Errorf("forgetting longer names forgot %q", names[1])
	}
	// A long name is copied, not kept as a part of the caller's larger string, and a refresh of its
	// record keeps that copy.
	whole := "album\x00" + strings.Repeat("9", 1000)
	long := whole[:64]
	g.putIf(long, 1, 0, &inv)
	first := g.find(xxhash.Sum64String(long))
	if first == nil || !first.is(long) {
		t.Fatalf("no record for %q", long)
	}
	if unsafe.StringData(first.long) == unsafe.StringData(whole) {
		t.Error("the record keeps the caller's string")
	}
	g.putIf(long, 2, 0, &inv)
	if again := g.find(xxhash.Sum64String(long)); again == nil || again.gen != 2 || unsafe.StringData(again.long) != unsafe.StringData(first.long) {
		t.Error("a refresh did not reuse the record's copy of its name")
	}
}

// Lookups take no lock: while writers fill, evict, forget and flush a table much smaller than their
// names, a lookup finds a name's own generation or nothing, never another name's.
func TestTrustedGensLookupsDuringWrites(t *testing.T) {
	acquireClock()
	defer releaseClock()
	g := newTrustedGens(16, int64(time.Minute)) // 4 buckets for 200 names: constant eviction
	var inv invalidations
	names := make([]string, 200)
	for i := range names {
		names[i] = fmt.Sprintf("artist\x00%d", i)
	}
	var wg sync.WaitGroup
	var found atomic.Int64
	stop := make(chan struct{})
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				i := (n*7 + w) % len(names)
				g.putIf(names[i], uint64(i), 0, &inv)
				switch n % 50 {
				case 17:
					g.forget(names[(i+1)%len(names)])
				case 49:
					g.forgetAll()
				}
			}
		}()
	}
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range 200_000 {
				i := n % len(names)
				if v, ok := g.get(names[i], xxhash.Sum64String(names[i])); ok {
					found.Add(1)
					if v != uint64(i) {
						t.Errorf("%q read generation %d, another name's", names[i], v)
						return
					}
				}
			}
		}()
	}
	for start := time.Now(); found.Load() == 0 && time.Since(start) < 5*time.Second; {
		time.Sleep(time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if found.Load() == 0 {
		t.Fatal("no lookup found a generation: the test checked nothing")
	}
	if n, limit := g.len(), len(g.buckets)*genWays; n > limit {
		t.Errorf("%d generations held, want at most %d", n, limit)
	}
}

func TestGenerationTTLValidation(t *testing.T) {
	e := newMiniEnv(t)
	o := e.opts()
	o.GenerationTTL = time.Microsecond
	if _, err := New[ImageMeta](o); err == nil {
		t.Error("New accepted a GenerationTTL of 1us")
	}
	o.GenerationTTL = -1
	c, err := New[ImageMeta](o)
	if err != nil {
		t.Fatalf("New with GenerationTTL -1: %v", err)
	}
	defer c.Close()
	if c.gens != nil {
		t.Error("GenerationTTL -1 left the trust on")
	}
	k := NewKey("artist", "off")
	if err := c.Set(ctx, k, metaV("off", 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, k); err != nil {
		t.Fatal(err)
	}
}

// heard waits until c has received n bus messages from other instances. A message moves the
// invalidation sequence of the keys it names, so a read that it overtakes does not trust the
// generations it read: tests that count round trips let the messages arrive first.
func heard(t *testing.T, c *Cache[ImageMeta], n uint64) {
	t.Helper()
	eventually(t, func() error {
		if got := c.Stats().BusReceived; got < n {
			return fmt.Errorf("%d bus messages received, want %d", got, n)
		}
		return nil
	})
}

// TestTrustedGenMemory reports the heap a trusted generation costs (an entity's head as the key,
// the generation and its expiry, the map's slot) and fails above 150 B: at the default bound of
// 10,000 that is under 1.5 MB. go test -run TrustedGenMemory -v .
func TestTrustedGenMemory(t *testing.T) {
	acquireClock()
	defer releaseClock()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	g := newTrustedGens(DefaultL1Size, int64(time.Minute))
	var inv invalidations
	for i := range DefaultL1Size {
		g.putIf(fmt.Sprintf("artist\x00%d", 1_000_000+i), uint64(i), 0, &inv)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	n := g.len()
	per := (int64(after.HeapAlloc) - int64(before.HeapAlloc)) / int64(n)
	t.Logf("%d generations held (at most %d), %d B each", n, len(g.buckets)*genWays, per)
	if per > 150 {
		t.Errorf("%d B per trusted generation, want at most 150", per)
	}
	runtime.KeepAlive(g)
}

// failUnlink is a go-redis hook that fails every pipeline holding an UNLINK, before it is sent.
type failUnlink struct{}

func (failUnlink) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (failUnlink) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (failUnlink) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			if cmd.Name() == "unlink" {
				err := errors.New("injected UNLINK failure")
				cmd.SetErr(err)
				return err
			}
		}
		return next(ctx, cmds)
	}
}

// An invalidation that fails after its script moved the generation (here its UNLINK of the members
// fails, so the values stamped with the old generation stay in Redis) still reaches the other
// instances: its message is queued, and the bus goroutine publishes it, so that no instance keeps
// trusting the old generation and serving those values. The invalidating instance forgets at once.
func TestFailedInvalidationStillReachesTrustedGenerations(t *testing.T) {
	for _, tc := range []struct {
		name       string
		invalidate func(c *Cache[ImageMeta]) error
	}{
		{"entity", func(c *Cache[ImageMeta]) error { return c.InvalidateEntity(ctx, "artist", "fail") }},
		{"tag", func(c *Cache[ImageMeta]) error { return c.InvalidateTags(ctx, "album:fail") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newNodeEnv(t) // a hooked *redis.Client on one node's address
			o := e.opts()
			o.L1Size = -1
			failing := redis.NewClient(&redis.Options{Addr: e.node().Options().Addr, ContextTimeoutEnabled: true})
			failing.AddHook(failUnlink{})
			t.Cleanup(func() { _ = failing.Close() })
			fo := o
			fo.Redis = failing
			a, b := newCache[ImageMeta](e, fo), newCache[ImageMeta](e, o)
			k := NewKey("artist", "fail").With("size", "64")
			if err := a.Set(ctx, k, metaV("fail", 1), WithTags("album:fail")); err != nil {
				t.Fatal(err)
			}
			heard(t, b, 1)
			for _, c := range []*Cache[ImageMeta]{a, b} {
				if err := wantETag(c, k, `"fail-v1"`)(); err != nil {
					t.Fatal(err)
				}
			}
			if err := tc.invalidate(a); err == nil {
				t.Fatal("the invalidation succeeded; want the injected UNLINK failure")
			}
			old := e.raw(k)
			if old == "" {
				t.Fatal("the value is gone from Redis: the failure was not injected")
			}
			if err := wantMiss(a, k)(); err != nil {
				t.Errorf("the invalidating instance: %v", err)
			}
			// a's read found the value stale and deleted it; put it back for b to find.
			if err := e.rdb.Set(ctx, e.redisKey(k), old, time.Minute).Err(); err != nil {
				t.Fatal(err)
			}
			eventually(t, wantMiss(b, k))
		})
	}
}

// A failed invalidation's message waits while Redis refuses everything, and goes out once Redis
// answers again.
func TestOutboxWaitsForRedis(t *testing.T) {
	e := newMiniEnv(t)
	o := e.opts()
	o.BreakerThreshold = -1
	a, b := newCache[ImageMeta](e, o), newCache[ImageMeta](e, o)
	k := NewKey("artist", "later")
	if err := a.Set(ctx, k, metaV("later", 1)); err != nil {
		t.Fatal(err)
	}
	heard(t, b, 1)
	if err := wantETag(b, k, `"later-v1"`)(); err != nil {
		t.Fatal(err)
	}
	e.mr.SetError("ERR refusing")
	if err := a.InvalidateEntity(ctx, "artist", "later"); err == nil {
		t.Fatal("InvalidateEntity succeeded against a refusing Redis")
	}
	time.Sleep(3 * busPoll) // the bus goroutine tries, and fails, to publish
	if n := a.Stats().BusSent; n != 1 {
		t.Errorf("BusSent = %d while Redis refuses, want 1 (the Set's)", n)
	}
	e.mr.SetError("")
	eventually(t, func() error {
		if _, ok := b.trustedGen("artist\x00later"); ok {
			return errors.New("b still trusts the entity's generation")
		}
		return nil
	})
	if s := b.Stats(); s.BusReceived != 2 || s.BusResubscribes != 0 {
		t.Errorf("b: BusReceived %d, BusResubscribes %d; want the queued message (2 in all), no resubscription", s.BusReceived, s.BusResubscribes)
	}
}

// A value written under a tag generation newer than the one this instance trusts is read again
// with the tag's generation from Redis, and served.
func TestStampNewerThanTrustedTagIsReadAgain(t *testing.T) {
	e := newNodeEnv(t) // counts the commands of a single node's reads
	o := e.opts()
	o.L1Size = -1
	c, rt := countedCache(t, e, o)
	k := NewKey("artist", "tagged")
	if err := c.Set(ctx, k, metaV("tagged", 1), WithTags("label:x")); err != nil {
		t.Fatal(err)
	}
	if err := wantETag(c, k, `"tagged-v1"`)(); err != nil {
		t.Fatal(err)
	}
	// Another instance's tag invalidation, unheard: the tag's generation moves in Redis only.
	if err := e.rdb.HIncrBy(ctx, c.l2.tagMeta("label:x"), "g", 1).Err(); err != nil {
		t.Fatal(err)
	}
	other := newCache[ImageMeta](e, e.opts())
	if err := other.Set(ctx, k, metaV("tagged", 2), WithTags("label:x")); err != nil {
		t.Fatal(err)
	}
	heard(t, c, 1)
	rt.take()
	for range 2 {
		if err := wantETag(c, k, `"tagged-v2"`)(); err != nil {
			t.Fatal(err)
		}
	}
	if names := calls(rt); !slices.Equal(names, []string{"get", "mget", "hget", "get"}) {
		t.Errorf("calls %q, want a GET, the MGET and HGET that read the generations, then a GET", names)
	}
	if s := c.Stats(); s.L2Stale != 0 {
		t.Errorf("L2Stale = %d, want 0", s.L2Stale)
	}
}

// With GenerationTTL negative an instance checks the generations in Redis on every read, so it
// misses a value invalidated elsewhere at once, whether or not the bus message has arrived.
func TestUntrustingInstanceSeesInvalidationsAtOnce(t *testing.T) {
	e := newEnv(t)
	o := e.opts()
	o.L1Size, o.GenerationTTL = -1, -1
	a, b := newCache[ImageMeta](e, e.opts()), newCache[ImageMeta](e, o)
	k := NewKey("artist", "exact")
	if err := a.Set(ctx, k, metaV("exact", 1)); err != nil {
		t.Fatal(err)
	}
	if err := wantETag(b, k, `"exact-v1"`)(); err != nil {
		t.Fatal(err)
	}
	old := e.raw(k)
	if err := a.InvalidateEntity(ctx, "artist", "exact"); err != nil {
		t.Fatal(err)
	}
	// As a load that was in flight would: the old value, stamped with the old generation.
	if err := e.rdb.Set(ctx, e.redisKey(k), old, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	if err := wantMiss(b, k)(); err != nil {
		t.Error(err)
	}
}

// The table is made whole at New, so its size is bounded, whatever L1Size asks for, and a huge size
// does not overflow into a tiny table. (Found by review: L1Size 10,000,000 made 512 MiB, and
// math.MaxInt one bucket.)
func TestTrustedGensTableSize(t *testing.T) {
	for _, c := range []struct{ size, slots int }{
		{1, genWays},
		{DefaultL1Size, 32768},
		{maxTrustedGens, 2 * maxTrustedGens},
		{10_000_000, 2 * maxTrustedGens},
		{math.MaxInt, 2 * maxTrustedGens},
	} {
		if got := len(newTrustedGens(c.size, int64(time.Minute)).buckets) * genWays; got != c.slots {
			t.Errorf("newTrustedGens(%d): %d slots, want %d", c.size, got, c.slots)
		}
	}
}
