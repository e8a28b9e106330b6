package imgcache

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/redis/go-redis/v9"
)

// The benchmarks pair each cache operation with the floor it is built on, in one run, so that a
// ratio can be read off directly:
//
//	go test -run '^$' -bench . -benchmem -count 6 . | tee new.txt && benchstat new.txt
//
// With IMGCACHE_REDIS_ADDR set the L2 benchmarks also run against that Redis ("real" rows).

const benchKeys = 1024

func benchKeySet() ([]Key, []string) {
	keys := make([]Key, benchKeys)
	strs := make([]string, benchKeys)
	for i := range keys {
		keys[i] = NewKey("artist", fmt.Sprint(i)).With("type", "avatar").With("size", "256")
		strs[i] = keys[i].String()
	}
	return keys, strs
}

func BenchmarkL1Hit(b *testing.B) {
	keys, strs := benchKeySet()
	meta := sampleMeta("1")
	b.Run("imgcache", func(b *testing.B) {
		c, err := New[ImageMeta](Options{})
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		for _, k := range keys {
			_ = c.Set(context.Background(), k, meta)
		}
		b.ReportAllocs()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, err := c.Get(context.Background(), keys[i&(benchKeys-1)]); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("golang-lru", func(b *testing.B) {
		c, _ := lru.New[string, ImageMeta](DefaultL1Size)
		for _, s := range strs {
			c.Add(s, meta)
		}
		b.ReportAllocs()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, ok := c.Get(strs[i&(benchKeys-1)]); !ok {
				b.Fatal("miss")
			}
		}
	})
}

func BenchmarkL1HitParallel(b *testing.B) {
	keys, strs := benchKeySet()
	meta := sampleMeta("1")
	b.Run("imgcache", func(b *testing.B) {
		c, err := New[ImageMeta](Options{})
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		for _, k := range keys {
			_ = c.Set(context.Background(), k, meta)
		}
		b.ReportAllocs()
		b.ResetTimer()
		var worker atomic.Int64
		b.RunParallel(func(pb *testing.PB) {
			// Start each goroutine elsewhere in the key set, as independent requests would, instead
			// of walking the same keys in lockstep onto the same shard.
			for i := int(worker.Add(1)) * 397; pb.Next(); i++ {
				_, _ = c.Get(context.Background(), keys[i&(benchKeys-1)])
			}
		})
	})
	b.Run("golang-lru", func(b *testing.B) {
		c, _ := lru.New[string, ImageMeta](DefaultL1Size)
		for _, s := range strs {
			c.Add(s, meta)
		}
		b.ReportAllocs()
		b.ResetTimer()
		var worker atomic.Int64
		b.RunParallel(func(pb *testing.PB) {
			for i := int(worker.Add(1)) * 397; pb.Next(); i++ {
				_, _ = c.Get(strs[i&(benchKeys-1)])
			}
		})
	})
}

func BenchmarkGetOrLoadHit(b *testing.B) {
	keys, _ := benchKeySet()
	meta := sampleMeta("1")
	c, err := New[ImageMeta](Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	load := func(context.Context) (ImageMeta, error) { return meta, nil }
	for _, k := range keys {
		_, _ = c.GetOrLoad(context.Background(), k, load)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.GetOrLoad(context.Background(), keys[i&(benchKeys-1)], load); err != nil {
			b.Fatal(err)
		}
	}
}

// benchBackends returns miniredis and, with IMGCACHE_REDIS_ADDR, the real Redis.
func benchBackends(b *testing.B) map[string]*testEnv {
	envs := map[string]*testEnv{"miniredis": newMiniEnv(b)}
	if realRedisAddr != "" {
		envs["real"] = newNodeEnv(b) // the floors they are measured against are one node's (MGET)
	}
	return envs
}

func BenchmarkL2Hit(b *testing.B) {
	keys, _ := benchKeySet()
	meta := sampleMeta("1")
	for name, e := range benchBackends(b) {
		opts := e.opts()
		opts.L1Size = -1 // every Get reads Redis
		c := newCache[ImageMeta](e, opts)
		for _, k := range keys {
			if err := c.Set(context.Background(), k, meta); err != nil {
				b.Fatal(err)
			}
		}
		b.Run("imgcache/"+name, func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				if _, err := c.Get(context.Background(), keys[i&(benchKeys-1)]); err != nil {
					b.Fatal(err)
				}
			}
		})
		rkeys := make([]string, len(keys))
		for i, k := range keys {
			rkeys[i] = e.redisKey(k)
		}
		// The floor: a plain GET of the same bytes and a decode of the same payload (found with
		// decodeEnvelope, which allocates nothing: the stamp's length varies with its generations).
		b.Run("go-redis-GET+decode/"+name, func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				data, err := e.rdb.Get(context.Background(), rkeys[i&(benchKeys-1)]).Bytes()
				if err != nil {
					b.Fatal(err)
				}
				env, err := decodeEnvelope(data, c.codecID, c.maxValue)
				if err != nil {
					b.Fatal(err)
				}
				var m ImageMeta
				if err := m.UnmarshalBinary(env.payload); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkMissAndLoad(b *testing.B) {
	meta := sampleMeta("1")
	load := func(context.Context) (ImageMeta, error) { return meta, nil }
	for name, e := range benchBackends(b) {
		c := newCache[ImageMeta](e, e.opts())
		var round atomic.Int64
		b.Run("imgcache/"+name, func(b *testing.B) {
			b.ReportAllocs()
			r := fmt.Sprint(round.Add(1))
			for i := 0; i < b.N; i++ {
				if _, err := c.GetOrLoad(context.Background(), NewKey("miss", fmt.Sprint(i)).With("round", r), load); err != nil {
					b.Fatal(err)
				}
			}
		})
		// The floor: GET (a miss), load, encode, SET PX. Keys are new in every round, as the
		// imgcache rows' are (the flight stores them; a second round would hit).
		var next atomic.Int64
		b.Run("go-redis-GET+SET/"+name, func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				rkey := e.ns + ":raw:" + fmt.Sprint(next.Add(1))
				if err := e.rdb.Get(context.Background(), rkey).Err(); err != redis.Nil {
					b.Fatal(err)
				}
				v, _ := load(context.Background())
				data, _ := v.MarshalBinary()
				if err := e.rdb.Set(context.Background(), rkey, data, DefaultTTL).Err(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkKeyBuild(b *testing.B) {
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		k := NewKey("artist", "12345").With("type", "avatar").With("size", "256")
		if len(k.String()) == 0 {
			b.Fatal("empty")
		}
	}
}

// spin stands for a loader's work (a fast database query): about 50us of CPU, the same every time.
func spin() ImageMeta {
	deadline := time.Now().Add(50 * time.Microsecond)
	for time.Now().Before(deadline) {
	}
	return sampleMeta("1")
}

// BenchmarkBreakerOpen: with Redis blackholed and the breaker open, a GetOrLoad miss costs about
// the loader alone. Each iteration loads a new key.
func BenchmarkBreakerOpen(b *testing.B) {
	load := func(context.Context) (ImageMeta, error) { return spin(), nil }
	e := newMiniEnv(b)
	p := newProxy(b, e.mr.Addr())
	rdb := redis.NewClient(&redis.Options{Addr: p.addr(), ContextTimeoutEnabled: true})
	b.Cleanup(func() { _ = rdb.Close() })
	opts := Options{Redis: rdb, Namespace: e.ns, L2Timeout: 20 * time.Millisecond, BreakerThreshold: 1, BreakerCooldown: time.Hour}
	c := newCache[ImageMeta](e, opts)
	p.setBlackhole(true)
	_, _ = c.Get(context.Background(), NewKey("trip", "1")) // one timeout opens the breaker
	if !c.Stats().L2BreakerOpen {
		b.Fatal("the breaker did not open")
	}
	var round atomic.Int64
	run := func(ctx context.Context) func(b *testing.B) {
		return func(b *testing.B) {
			r := fmt.Sprint(round.Add(1))
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				if _, err := c.GetOrLoad(ctx, NewKey("miss", fmt.Sprint(i)).With("round", r), load); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
	b.Run("imgcache/background-ctx", run(context.Background()))
	// With a context that can end, as a request's can, the load runs in a goroutine of its own so
	// that the caller can leave early, and pays for the handoff.
	cctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b.Run("imgcache/cancellable-ctx", run(cctx))
	b.Run("loader-alone", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			_, _ = load(context.Background())
		}
	})
}
