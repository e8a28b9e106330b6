package imgcache

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Invalidation benchmarks. Each iteration invalidates one entity, tag or pattern that covers
// invCovered entries, written before the timed part of the iteration (with the timer stopped), on a
// cache that has nothing else to do:
//
//	go test -run '^$' -bench 'Invalidate|BusPropagation' -benchtime 20x .
//	IMGCACHE_REDIS_ADDR=127.0.0.1:6379 go test -run '^$' -bench 'Invalidate|BusPropagation' \
//		-benchtime 30x -count 6 . | tee invalidate.txt && benchstat invalidate.txt
//
// Use an iteration count (-benchtime Nx), not a duration: the untimed writes cost several times the
// invalidation, so a duration target would run for minutes; 30x with -count 6 takes about four
// minutes against a real Redis, most of it in InvalidatePattern's SCAN of the 1M keys described
// next (under a second per call) and in writing and removing them (a few seconds, three times). They
// always run on miniredis (whose B/op and allocs/op include the in-process server's) and, with
// IMGCACHE_REDIS_ADDR set, on that Redis ("real"), where a "real/1M-unrelated" variant first fills
// it with 1,000,000 keys under another prefix. The target for InvalidateEntity and
// InvalidateTags is under 5 ms per call on loopback with those keys present: their cost is one
// script per meta hash and an UNLINK per member, whatever else Redis holds. Every key a benchmark
// writes to a real Redis is removed when it ends.

// invCovered is how many cached entries one invalidation covers.
const invCovered = 20

// unrelatedKeys is the size of the keyspace the "/1M-unrelated" variants add, in batches of
// unrelatedBatch pipelined SETs.
const (
	unrelatedKeys  = 1_000_000
	unrelatedBatch = 10_000
)

func BenchmarkInvalidateEntity(b *testing.B) {
	// Batch id: the variants (sizes) of one artist, all under NewKey("artist", id).
	keys := func(id string) []Key {
		ks := make([]Key, invCovered)
		for j := range ks {
			ks[j] = NewKey("artist", id).With("size", strconv.Itoa(64*(j+1)))
		}
		return ks
	}
	benchInvalidate(b, func(ctx context.Context, c *Cache[ImageMeta], id string) ([]Key, error) {
		ks := keys(id)
		return ks, setAll(ctx, c, ks)
	}, func(ctx context.Context, c *Cache[ImageMeta], id string) error {
		return c.InvalidateEntity(ctx, "artist", id)
	})
}

func BenchmarkInvalidateTags(b *testing.B) {
	// Batch id: one album cover each of 20 albums, all tagged "artist:<id>".
	benchInvalidate(b, func(ctx context.Context, c *Cache[ImageMeta], id string) ([]Key, error) {
		ks := make([]Key, invCovered)
		for j := range ks {
			ks[j] = NewKey("album", id+"-"+strconv.Itoa(j)).With("type", "cover")
		}
		return ks, setAll(ctx, c, ks, WithTags("artist:"+id))
	}, func(ctx context.Context, c *Cache[ImageMeta], id string) error {
		return c.InvalidateTags(ctx, "artist:"+id)
	})
}

// BenchmarkInvalidatePattern walks Redis with SCAN (COUNT 1000) however few keys match, so its cost
// grows with the whole keyspace of the database, not with the matches: the "real/1M-unrelated"
// variant shows that cost (about a thousand SCAN round trips per call), and has no target. Prefer
// InvalidateEntity and InvalidateTags for routine invalidation.
func BenchmarkInvalidatePattern(b *testing.B) {
	// Batch id: artists "<id>-0" to "<id>-19", matched by "artist:<id>-*". Batch ids end in a digit
	// and the pattern in '-', so no batch's pattern matches another's artists.
	benchInvalidate(b, func(ctx context.Context, c *Cache[ImageMeta], id string) ([]Key, error) {
		ks := make([]Key, invCovered)
		for j := range ks {
			ks[j] = NewKey("artist", id+"-"+strconv.Itoa(j)).With("type", "avatar")
		}
		return ks, setAll(ctx, c, ks)
	}, func(ctx context.Context, c *Cache[ImageMeta], id string) error {
		n, err := c.InvalidatePattern(ctx, "artist:"+id+"-*")
		if err == nil && n != invCovered {
			err = fmt.Errorf("InvalidatePattern removed %d values, want %d", n, invCovered)
		}
		return err
	})
}

// benchInvalidate runs one invalidation benchmark on every backend. write stores batch id's
// entries and returns their keys; invalidate removes them, timed.
//
// Every run (each b.N, each -count) gets a namespace and a cache of its own: bookkeeping left by
// earlier runs would otherwise pile up (a meta hash per entity id outlives its values by
// metaTTL) and slow down the SCAN of later InvalidatePattern runs.
func benchInvalidate(b *testing.B,
	write func(ctx context.Context, c *Cache[ImageMeta], id string) ([]Key, error),
	invalidate func(ctx context.Context, c *Cache[ImageMeta], id string) error,
) {
	ctx := context.Background()
	run := func(b *testing.B, e *testEnv) {
		c := newCache[ImageMeta](e, e.opts())
		var last []Key
		b.ReportAllocs()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			id := strconv.Itoa(i)
			ks, err := write(ctx, c, id)
			if err != nil {
				b.Fatalf("write batch %s: %v", id, err)
			}
			last = ks
			b.StartTimer()
			if err := invalidate(ctx, c, id); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		// The last batch must be gone from both levels: otherwise nothing was measured.
		for _, k := range last {
			if _, err := c.Get(ctx, k); !errors.Is(err, ErrNotFound) {
				b.Fatalf("%s survived its invalidation: %v", k, err)
			}
		}
		if n, err := e.rdb.Exists(ctx, redisKeys(e, last)...).Result(); err != nil || n != 0 {
			b.Fatalf("%d of the last batch's keys are still in Redis (err %v)", n, err)
		}
	}
	b.Run("miniredis", func(b *testing.B) { run(b, newMiniEnv(b)) })
	if realRedisAddr == "" {
		return
	}
	b.Run("real", func(b *testing.B) { run(b, newRealEnv(b)) })
	populated := false
	b.Run("real/1M-unrelated", func(sb *testing.B) {
		if !populated { // the first run (b.N == 1) fills Redis; the later ones, -count included, reuse it
			populated = true
			populateUnrelated(sb, b)
		}
		run(sb, newRealEnv(sb))
	})
}

// newRealEnv returns the Redis at IMGCACHE_REDIS_ADDR, under a fresh namespace that is emptied when
// b ends, after the caches made on it are closed (newCache registers their Close later, so it runs
// first).
func newRealEnv(b *testing.B) *testEnv {
	e := newNodeEnv(b) // the benchmarks measure one node; unlinkMatching scans one
	b.Cleanup(func() { unlinkMatching(b, e.node(), e.ns+":*") })
	return e
}

// setAll writes keys concurrently, to keep the untimed part of an iteration short.
func setAll(ctx context.Context, c *Cache[ImageMeta], keys []Key, opts ...SetOption) error {
	errs := make([]error, len(keys))
	var wg sync.WaitGroup
	for i, k := range keys {
		wg.Go(func() { errs[i] = c.Set(ctx, k, sampleMeta(strconv.Itoa(i)), opts...) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

func redisKeys(e *testEnv, keys []Key) []string {
	rks := make([]string, len(keys))
	for i, k := range keys {
		rks[i] = e.redisKey(k)
	}
	return rks
}

// populateUnrelated writes unrelatedKeys small keys to the real Redis under a prefix of their own,
// outside any cache namespace, in pipelines of unrelatedBatch SETs; parent's cleanup removes them.
// Their 10-minute TTL is only a safety net should the process die before that.
func populateUnrelated(sb, parent *testing.B) {
	rdb := redis.NewClient(&redis.Options{Addr: realRedisAddr})
	parent.Cleanup(func() { _ = rdb.Close() }) // after the removal, registered next
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	prefix := "bench_unrelated_" + hex.EncodeToString(rnd[:]) + ":"
	parent.Cleanup(func() {
		start := time.Now()
		n := unlinkMatching(parent, rdb, prefix+"*")
		parent.Logf("removed %d unrelated keys in %v", n, time.Since(start).Round(time.Millisecond))
	})
	ctx := context.Background()
	start := time.Now()
	// Four pipelines in flight at once, each taking every fourth batch, keep both Redis and this
	// client busy: about a third faster than one at a time on two cores.
	const workers = 4
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for lo := w * unrelatedBatch; lo < unrelatedKeys && errs[w] == nil; lo += workers * unrelatedBatch {
				_, errs[w] = rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
					for i := lo; i < lo+unrelatedBatch; i++ {
						p.Set(ctx, prefix+strconv.Itoa(i), "x", 10*time.Minute)
					}
					return nil
				})
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		sb.Fatalf("populate %s*: %v", prefix, err)
	}
	sb.Logf("wrote %d unrelated keys under %s in %v", unrelatedKeys, prefix, time.Since(start).Round(time.Millisecond))
}

// unlinkMatching removes every key matching match with SCAN MATCH and pipelined UNLINKs (never
// KEYS, FLUSHDB or FLUSHALL: other tests share the Redis) and returns how many it removed.
func unlinkMatching(tb testing.TB, rdb *redis.Client, match string) int {
	ctx := context.Background()
	n := 0
	for cursor := uint64(0); ; {
		keys, next, err := rdb.Scan(ctx, cursor, match, unrelatedBatch).Result()
		if err != nil {
			tb.Errorf("SCAN %s: %v", match, err)
			return n
		}
		if len(keys) > 0 {
			if _, err := rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
				for _, k := range keys {
					p.Unlink(ctx, k)
				}
				return nil
			}); err != nil {
				tb.Errorf("UNLINK %s: %v", match, err)
				return n
			}
			n += len(keys)
		}
		if cursor = next; cursor == 0 {
			return n
		}
	}
}

// BenchmarkBusPropagation measures how long a write on one instance takes to reach the L1 of two
// others: three caches on one Redis (the real one with IMGCACHE_REDIS_ADDR, else miniredis), each
// with a client of its own as separate processes would have. In each iteration B and C hold the key
// in L1, A Sets it, and a sample is the time from the start of A's Set until B's (or C's) busHook
// has run, that is, until that instance has dropped its copy. ns/op is the time until both have;
// p50-ms and p99-ms are over all samples, two per iteration. The target is a p99 under
// 5 ms against a real Redis.
func BenchmarkBusPropagation(b *testing.B) {
	ctx := context.Background()
	var e *testEnv
	if realRedisAddr != "" {
		e = newRealEnv(b)
	} else {
		e = newMiniEnv(b)
	}
	var caches [3]*Cache[ImageMeta]
	var heard [3]chan time.Time
	for i := range caches {
		rdb := redis.NewClient(&redis.Options{Addr: e.node().Options().Addr, ContextTimeoutEnabled: true})
		b.Cleanup(func() { _ = rdb.Close() }) // after the cache's Close, which is registered next
		o := e.opts()
		o.Redis = rdb
		caches[i] = newCache[ImageMeta](e, o)
		// busHook is an atomic pointer: the bus goroutine, which New has started, reads it.
		ch := make(chan time.Time, 16)
		heard[i] = ch
		hook := func(busKind) {
			select {
			case ch <- time.Now():
			default: // never block the bus goroutine; a missing sample fails the benchmark below
			}
		}
		caches[i].busHook.Store(&hook)
	}
	a, others := caches[0], caches[1:]
	k := NewKey("artist", "bus").With("type", "avatar")
	timeout := time.NewTimer(time.Hour)
	defer timeout.Stop()
	// await returns when instance j's hook reports, with the time it ran.
	await := func(j int) time.Time {
		timeout.Reset(2 * time.Second)
		select {
		case t := <-heard[j]:
			return t
		case <-timeout.C:
			b.Fatalf("instance %d heard nothing from A within 2s", j)
			return time.Time{}
		}
	}
	for _, c := range others {
		_, _ = c.Get(ctx, k)
	}
	if err := a.Set(ctx, k, sampleMeta("0")); err != nil {
		b.Fatal(err)
	}
	await(1)
	await(2)

	samples := make([]time.Duration, 0, 2*b.N)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		for j, c := range others {
			if _, err := c.Get(ctx, k); err != nil { // a Redis hit, now in L1
				b.Fatal(err)
			}
			if len(heard[j+1]) != 0 {
				b.Fatalf("instance %d heard a message nobody sent", j+1)
			}
		}
		v := sampleMeta(strconv.Itoa(i + 1))
		b.StartTimer()
		start := time.Now()
		if err := a.Set(ctx, k, v); err != nil {
			b.Fatal(err)
		}
		samples = append(samples, await(1).Sub(start), await(2).Sub(start))
	}
	b.StopTimer()
	for j, c := range others {
		if got := c.Stats().BusReceived; got != uint64(b.N)+1 {
			b.Fatalf("instance %d applied %d messages, want %d", j+1, got, b.N+1)
		}
	}
	slices.Sort(samples)
	b.ReportMetric(quantileMs(samples, 0.50), "p50-ms")
	b.ReportMetric(quantileMs(samples, 0.99), "p99-ms")
}

// quantileMs returns the q-quantile of sorted samples (nearest rank), in milliseconds.
func quantileMs(sorted []time.Duration, q float64) float64 {
	i := int(math.Ceil(float64(len(sorted))*q)) - 1
	return float64(sorted[max(i, 0)]) / float64(time.Millisecond)
}
