package bench

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	rediscache "github.com/go-redis/cache/v9"
	"github.com/imgcache/imgcache"
)

// The paired benchmarks time imgcache and one peer in the same loop: every iteration runs one
// operation of each, alternating which goes first, and times each on its own. Noise (a neighbour
// on the host, a GC, the scheduler) then falls on both alike, and the ratio of their mean times
// holds still on a machine whose loopback round trips drift by 20% from one run to the next. Their
// rows report:
//
//	imgcache-ns/op   imgcache's mean time per operation
//	peer-ns/op       the peer's
//	imgcache/peer    the ratio: under 1 means imgcache is faster
//
// ns/op is the time of both operations and the clock readings around them. Only serial rows are
// paired: with many goroutines an operation's time is mostly its wait behind the others', which
// both sides share, so a paired ratio would shrink towards 1 and hide a difference in throughput.
// The parallel rows of BenchmarkL2Hit and BenchmarkZipfMixed measure throughput instead.
//
//	REDIS_ADDR=127.0.0.1:6379 go test -run '^$' -bench Paired -benchtime 20000x -count 6 .

// paired runs a and p (imgcache's operation and the peer's) b.N times each, one after the other,
// and reports their mean times and ratio. Every call must succeed.
func paired(b *testing.B, a, p func(i int) bool) {
	b.ReportAllocs()
	fails := 0
	var at, pt time.Duration
	for i := range b.N {
		first, second, ft, st := a, p, &at, &pt
		if i&1 == 1 {
			first, second, ft, st = p, a, &pt, &at
		}
		t0 := time.Now()
		ok1 := first(i & hitMask)
		t1 := time.Now()
		ok2 := second(i & hitMask)
		*ft += t1.Sub(t0)
		*st += time.Since(t1)
		if !ok1 || !ok2 {
			fails++
		}
	}
	if fails > 0 {
		b.Fatalf("%d failed iterations", fails)
	}
	b.ReportMetric(float64(at)/float64(b.N), "imgcache-ns/op")
	b.ReportMetric(float64(pt)/float64(b.N), "peer-ns/op")
	b.ReportMetric(float64(at)/float64(pt), "imgcache/peer")
}

// BenchmarkPaired: the Redis rows of BenchmarkL2Hit, BenchmarkGetOrLoadHit, BenchmarkGetMany and
// BenchmarkMissLoad, and its in-process miss, each imgcache operation paired with its floor or
// go-redis/cache.
func BenchmarkPaired(b *testing.B) {
	rdb := redisClient(b)
	ic, l2 := l2HitPeers(b, rdb)
	for _, p := range l2[1:] {
		b.Run("L2Hit/g=1/vs-"+p.name, func(b *testing.B) { paired(b, l2[0].get, p.get) })
	}
	// The floor again, on a connection held out of the pool as imgcache holds its reads' (Options.
	// ReadConns): go-redis then skips its per-command pool checks.
	held := rdb.Conn()
	defer held.Close()
	ks := hitSet()
	b.Run("L2Hit/g=1/vs-go-redis-GET+decode-held-conn", func(b *testing.B) {
		paired(b, l2[0].get, func(i int) bool {
			data, err := held.Get(context.Background(), rawKey(ks.Strs[i])).Bytes()
			if err != nil {
				return false
			}
			var m meta
			return m.UnmarshalBinary(data) == nil
		})
	})

	var loads atomic.Int64
	icGL, grcGL := newImgcache(b, rdb, -1), newGoRedisCache(rdb, false, false)
	gl := getOrLoadPeers(b, context.Background(), icGL, grcGL, &loads)
	b.Run("GetOrLoadL2Hit/g=1/vs-"+gl[1].name, func(b *testing.B) { paired(b, gl[0].get, gl[1].get) })
	// A service passes a request's context, which can be cancelled: the same hits under one.
	reqCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	gl = getOrLoadPeers(b, reqCtx, icGL, grcGL, &loads)
	b.Run("GetOrLoadL2Hit/cancellable-ctx/g=1/vs-"+gl[1].name, func(b *testing.B) { paired(b, gl[0].get, gl[1].get) })
	if n := loads.Load(); n > 0 {
		b.Errorf("%d loads during the GetOrLoad hits", n)
	}

	icMany, many := getManyPeers(b, rdb)
	for _, p := range many[1:] {
		b.Run("GetMany/g=1/vs-"+p.name, func(b *testing.B) { paired(b, many[0].get, p.get) })
	}

	icMiss := newImgcache(b, rdb, L1Capacity)
	b.Run("MissLoad/local/g=1/vs-go-redis-cache", pairedMisses(newImgcache(b, nil, L1Capacity), newGoRedisCache(nil, true, false)))
	b.Run("MissLoad/g=1/vs-go-redis-cache", pairedMisses(icMiss, newGoRedisCache(rdb, true, false)))
	// Without the lease (LocalLoadsOnly), as go-redis/cache has none: the row shows the lease's
	// share of the miss's cost.
	icNoLease := newImgcacheWith(b, rdb, L1Capacity, func(o *imgcache.Options) { o.LocalLoadsOnly = true })
	b.Run("MissLoad/LocalLoadsOnly/g=1/vs-go-redis-cache", pairedMisses(icNoLease, newGoRedisCache(rdb, true, false)))
	b.Run("MissLoad/cancellable-ctx/g=1/vs-go-redis-cache", pairedMissesCtx(reqCtx, icMiss, newGoRedisCache(rdb, true, false)))

	for _, c := range []*imgcache.Cache[meta]{ic, icMany, icMiss, icNoLease} {
		if n := c.Stats().L2Errors; n > 0 {
			b.Errorf("imgcache counted %d Redis errors", n)
		}
	}
}

// pairedMisses pairs imgcache's GetOrLoad with go-redis/cache's Once, each call on a key never
// asked for before.
func pairedMisses(ic *imgcache.Cache[meta], grc *rediscache.Cache) func(b *testing.B) {
	return pairedMissesCtx(context.Background(), ic, grc)
}

// pairedMissesCtx is pairedMisses with the callers' context.
func pairedMissesCtx(ctx context.Context, ic *imgcache.Cache[meta], grc *rediscache.Cache) func(b *testing.B) {
	value := Meta(1)
	load := func(context.Context) (meta, error) { return value, nil }
	return func(b *testing.B) {
		icKeys, _ := missKeys(b.N)
		_, grcStrs := missKeys(b.N)
		var ni, ng int // each call takes the next unused key
		paired(b, func(int) bool {
			_, err := ic.GetOrLoad(ctx, icKeys[ni], load)
			ni++
			return err == nil
		}, func(int) bool {
			err := grcLoad(ctx, grc, grcStrs[ng], value)
			ng++
			return err == nil
		})
	}
}
