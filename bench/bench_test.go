package bench

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	rediscache "github.com/go-redis/cache/v9"
	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/imgcache/imgcache"
	"github.com/maypok86/otter/v2"
	"github.com/redis/go-redis/v9"
	"github.com/viccon/sturdyc"
)

// Cross-peer benchmarks. Each benchmark's rows are named <Benchmark>/g=<goroutines>/<peer>, so
// that cmd/benchsum can set every peer beside imgcache. The Redis rows need a real Redis at
// REDIS_ADDR and are skipped without one; scripts/bench.sh starts one:
//
//	REDIS_ADDR=127.0.0.1:6379 go test -run '^$' -bench . -benchtime 100x ./...

type meta = imgcache.ImageMeta

const (
	hitKeys = 4096 // the working set of the hit benchmarks: well under every peer's capacity
	hitMask = hitKeys - 1
)

var (
	redisAddr = os.Getenv("REDIS_ADDR")
	// run names this process's keys in Redis, so that rounds never read each other's.
	run = strconv.FormatUint(rand.Uint64()>>32, 36)

	hitSet = sync.OnceValue(func() *KeySet { return NewKeySet(0, hitKeys) })

	sharedRedis = sync.OnceValues(func() (*redis.Client, error) {
		rdb := redis.NewClient(&redis.Options{Addr: redisAddr, ContextTimeoutEnabled: true})
		rdb.AddHook(roundTripCounter{})
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := rdb.Ping(ctx).Err(); err != nil {
			_ = rdb.Close()
			return nil, fmt.Errorf("REDIS_ADDR=%s: %w", redisAddr, err)
		}
		// Fill the connection pool now, so that no timed run pays for dialling.
		var wg sync.WaitGroup
		for range 64 {
			wg.Add(1)
			go func() { defer wg.Done(); _ = rdb.Ping(ctx).Err() }()
		}
		wg.Wait()
		return rdb, nil
	})
)

// roundTrips counts the client's calls to Redis: a command or a whole pipeline is one.
var roundTrips atomic.Int64

type roundTripCounter struct{}

func (roundTripCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

func (roundTripCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		roundTrips.Add(1)
		return next(ctx, cmd)
	}
}

func (roundTripCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		roundTrips.Add(1)
		return next(ctx, cmds)
	}
}

// redisClient returns the shared client (the same pool for every peer), skipping without Redis.
func redisClient(b *testing.B) *redis.Client {
	b.Helper()
	if redisAddr == "" {
		b.Skip("REDIS_ADDR is not set")
	}
	rdb, err := sharedRedis()
	if err != nil {
		b.Fatal(err)
	}
	return rdb
}

// maybeRedis returns the shared client, or nil without REDIS_ADDR.
func maybeRedis(b *testing.B) *redis.Client {
	if redisAddr == "" {
		return nil
	}
	return redisClient(b)
}

// newImgcache makes an imgcache under this process's namespace.
func newImgcache(b *testing.B, rdb *redis.Client, l1Size int) *imgcache.Cache[meta] {
	b.Helper()
	return newImgcacheWith(b, rdb, l1Size, nil)
}

// newImgcacheWith is newImgcache with its Options changed by set, if set is not nil.
func newImgcacheWith(b *testing.B, rdb *redis.Client, l1Size int, set func(*imgcache.Options)) *imgcache.Cache[meta] {
	b.Helper()
	opts := imgcache.Options{L1Size: l1Size, Namespace: "bench" + run}
	if rdb != nil {
		opts.Redis = rdb
	}
	if set != nil {
		set(&opts)
	}
	c, err := imgcache.New[meta](opts)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Close() })
	return c
}

// The go-redis/cache peers get ImageMeta's own binary encoding, the one imgcache uses by default,
// so that the rows compare caches and not codecs; the "-msgpack" row shows its default codec.
func binaryMarshal(v any) ([]byte, error) {
	switch m := v.(type) {
	case meta:
		return m.MarshalBinary()
	case *meta:
		return m.MarshalBinary()
	}
	return nil, fmt.Errorf("bench: cannot marshal %T", v)
}

func binaryUnmarshal(b []byte, v any) error { return v.(*meta).UnmarshalBinary(b) }

func newGoRedisCache(rdb *redis.Client, local bool, msgpack bool) *rediscache.Cache {
	o := &rediscache.Options{Marshal: binaryMarshal, Unmarshal: binaryUnmarshal}
	if msgpack {
		o.Marshal, o.Unmarshal = nil, nil
	}
	if rdb != nil {
		o.Redis = rdb
	}
	if local {
		o.LocalCache = rediscache.NewTinyLFU(L1Capacity, time.Minute)
	}
	return rediscache.New(o)
}

func grcKey(s string) string { return "grc" + run + ":" + s }
func rawKey(s string) string { return "raw" + run + ":" + s }

// setRaw writes the floors' copy of ks's i-th value, with its own SET.
//
// The floors' values are written as the peers' are, one command each and interleaved with them, as
// a service writes its values over time, so that every row reads values laid out alike in Redis's
// memory. Where Redis allocates a value decides how long an MGET takes it: on this machine an MGET of
// 100 values that one pipeline had written back to back took Redis about 20 us (INFO
// commandstats), and of the same bytes written one command at a time, interleaved with other
// writes, about 40 us, in the same Redis. A floor written in bulk would be timed on a layout no
// cache that writes on misses has.
func setRaw(b *testing.B, rdb *redis.Client, ks *KeySet, i int) {
	data, err := ks.Metas[i].MarshalBinary()
	if err == nil {
		err = rdb.Set(context.Background(), rawKey(ks.Strs[i]), data, time.Hour).Err()
	}
	if err != nil {
		b.Fatal(err)
	}
}

// goroutineCounts returns the levels of a benchmark: 1 is a plain loop, the others b.RunParallel
// with b.SetParallelism so that GOMAXPROCS*p is at least the level (the name gives the real count).
func goroutineCounts(levels ...int) []int {
	procs := runtime.GOMAXPROCS(0)
	var out []int
	seen := map[int]bool{}
	for _, g := range levels {
		if g > 1 {
			g = procs * ((g + procs - 1) / procs)
		}
		if !seen[g] {
			seen[g] = true
			out = append(out, g)
		}
	}
	return out
}

// drive runs get over the hit keys with g goroutines; every call must hit.
func drive(b *testing.B, g int, get func(i int) bool) {
	b.ReportAllocs()
	if g == 1 {
		for i := 0; i < b.N; i++ {
			if !get(i & hitMask) {
				b.Fatalf("miss on key %d", i&hitMask)
			}
		}
		return
	}
	b.SetParallelism(g / runtime.GOMAXPROCS(0))
	var worker, misses atomic.Int64
	b.RunParallel(func(pb *testing.PB) {
		// Each goroutine starts elsewhere in the key set, as independent requests would.
		n := 0
		for i := int(worker.Add(1)) * 997; pb.Next(); i++ {
			if !get(i & hitMask) {
				n++
			}
		}
		misses.Add(int64(n))
	})
	if n := misses.Load(); n > 0 {
		b.Fatalf("%d misses", n)
	}
}

// redisCommands reads the server's total_commands_processed.
func redisCommands(b *testing.B, rdb *redis.Client) int64 {
	info, err := rdb.Info(context.Background(), "stats").Result()
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(info, "\r\n") {
		if v, ok := strings.CutPrefix(line, "total_commands_processed:"); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	b.Fatal("no total_commands_processed in INFO stats")
	return 0
}

// countCommands reports, per operation of the timed part, the client's round trips to Redis (a
// pipeline is one) and the commands Redis executed (those a Lua script calls included; the INFO
// call itself excluded).
func countCommands(b *testing.B, rdb *redis.Client, f func()) {
	before := redisCommands(b, rdb)
	rt := roundTrips.Load()
	f()
	b.StopTimer()
	rt = roundTrips.Load() - rt
	after := redisCommands(b, rdb)
	b.ReportMetric(float64(rt)/float64(b.N), "roundtrips/op")
	b.ReportMetric(float64(after-before-1)/float64(b.N), "rediscmds/op")
	b.StartTimer()
}

type peer struct {
	name string
	get  func(i int) bool
}

// BenchmarkL1Hit: a hit in the in-process level, on 4,096 keys held by an L1 of 10,000.
// go-redis/cache's local cache holds encoded bytes, so its hit includes a decode.
func BenchmarkL1Hit(b *testing.B) {
	ks := hitSet()
	ctx := context.Background()
	rdb := maybeRedis(b)

	ic := newImgcache(b, rdb, L1Capacity)
	gl, _ := lru.New[string, meta](L1Capacity)
	ot := otter.Must(&otter.Options[string, meta]{MaximumSize: L1Capacity})
	st := sturdyc.New[meta](L1Capacity, 10, time.Minute, 10)
	grc := newGoRedisCache(rdb, true, false)
	grcMsgpack := newGoRedisCache(rdb, true, true)
	for i, k := range ks.Keys {
		if err := ic.Set(ctx, k, ks.Metas[i]); err != nil {
			b.Fatal(err)
		}
		s := ks.Strs[i]
		gl.Add(s, ks.Metas[i])
		ot.Set(s, ks.Metas[i])
		st.Set(s, ks.Metas[i])
		for _, c := range []*rediscache.Cache{grc, grcMsgpack} {
			if err := c.Set(&rediscache.Item{Ctx: ctx, Key: grcKey(s), Value: ks.Metas[i], TTL: time.Hour}); err != nil {
				b.Fatal(err)
			}
		}
	}
	grcGet := func(c *rediscache.Cache) func(int) bool {
		return func(i int) bool {
			var m meta
			return c.Get(ctx, grcKey(ks.Strs[i]), &m) == nil
		}
	}
	peers := []peer{
		{"imgcache", func(i int) bool { _, err := ic.Get(ctx, ks.Keys[i]); return err == nil }},
		{"golang-lru", func(i int) bool { _, ok := gl.Get(ks.Strs[i]); return ok }},
		{"otter", func(i int) bool { _, ok := ot.GetIfPresent(ks.Strs[i]); return ok }},
		{"sturdyc", func(i int) bool { _, ok := st.Get(ks.Strs[i]); return ok }},
		{"go-redis-cache", grcGet(grc)},
	}
	// Redis, if set, must not be what answers: check that every key is in every local level.
	if rdb != nil {
		before := redisCommands(b, rdb)
		for _, p := range append(peers, peer{"go-redis-cache-msgpack", grcGet(grcMsgpack)}) {
			for i := range hitKeys {
				if !p.get(i) {
					b.Fatalf("%s: key %d missing after Set", p.name, i)
				}
			}
		}
		if n := redisCommands(b, rdb) - before - 1; n != 0 {
			b.Fatalf("the L1 hit check sent %d commands to Redis", n)
		}
	}
	for _, g := range goroutineCounts(1, runtime.GOMAXPROCS(0), 64) {
		ps := peers
		if g == 1 {
			ps = append(ps, peer{"go-redis-cache-msgpack", grcGet(grcMsgpack)})
		}
		for _, p := range ps {
			b.Run(fmt.Sprintf("g=%d/%s", g, p.name), func(b *testing.B) { drive(b, g, p.get) })
		}
	}
}

// BenchmarkKeyBuild: building a key. imgcache normalises, escapes and hashes; the floor is a plain
// concatenation of the same parts.
func BenchmarkKeyBuild(b *testing.B) {
	b.Run("g=1/imgcache", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			k := imgcache.NewKey("artist", "12345").With("type", "avatar").With("size", "512")
			if len(k.String()) == 0 {
				b.Fatal("empty key")
			}
		}
	})
	b.Run("g=1/concat", func(b *testing.B) {
		b.ReportAllocs()
		id := "12345"
		for i := 0; i < b.N; i++ {
			s := "artist:" + id + ":size=512:type=avatar"
			if len(s) == 0 {
				b.Fatal("empty key")
			}
		}
	})
}

// BenchmarkL2Hit: a hit in Redis with no local level: imgcache with L1Size -1, go-redis/cache with
// no LocalCache, and the floor, a go-redis GET and a decode of the same bytes.
func BenchmarkL2Hit(b *testing.B) {
	rdb := redisClient(b)
	ic, peers := l2HitPeers(b, rdb)
	for _, g := range goroutineCounts(1, 4, 16, 64) {
		for _, p := range peers {
			b.Run(fmt.Sprintf("g=%d/%s", g, p.name), func(b *testing.B) {
				countCommands(b, rdb, func() { drive(b, g, p.get) })
			})
		}
	}
	if n := ic.Stats().L2Errors; n > 0 {
		b.Errorf("imgcache counted %d Redis errors", n)
	}
}

// l2HitPeers stores the hit keys in Redis for imgcache (with no L1), go-redis/cache (with no
// LocalCache) and the floor, and returns their reads, imgcache's first.
func l2HitPeers(b *testing.B, rdb *redis.Client) (*imgcache.Cache[meta], []peer) {
	ks := hitSet()
	ctx := context.Background()
	ic := newImgcache(b, rdb, -1)
	grc := newGoRedisCache(rdb, false, false)
	for i, k := range ks.Keys {
		if err := ic.Set(ctx, k, ks.Metas[i]); err != nil {
			b.Fatal(err)
		}
		if err := grc.Set(&rediscache.Item{Ctx: ctx, Key: grcKey(ks.Strs[i]), Value: ks.Metas[i], TTL: time.Hour}); err != nil {
			b.Fatal(err)
		}
		setRaw(b, rdb, ks, i)
	}
	return ic, []peer{
		{"imgcache", func(i int) bool { _, err := ic.Get(ctx, ks.Keys[i]); return err == nil }},
		{"go-redis-cache", func(i int) bool {
			var m meta
			return grc.Get(ctx, grcKey(ks.Strs[i]), &m) == nil
		}},
		{"go-redis-GET+decode", func(i int) bool {
			data, err := rdb.Get(ctx, rawKey(ks.Strs[i])).Bytes()
			if err != nil {
				return false
			}
			var m meta
			return m.UnmarshalBinary(data) == nil
		}},
	}
}

// batchSize is how many keys one batched read asks for.
const batchSize = 100

// BenchmarkGetMany: a batch of 100 keys, all in Redis and none in L1 (imgcache with L1Size -1), read
// by imgcache's GetMany and by two floors, each one go-redis MGET and a decode of each value into a
// slice of the batch's values, which a caller gets back as it gets GetMany's:
//
//   - go-redis-MGET+decode reads the very keys imgcache wrote and decodes each value's payload
//     (past imgcache's envelope), so that Redis does the same work for both rows and the ratio is
//     imgcache's own cost. It is the floor of the GetMany target.
//   - go-redis-MGET+decode-own-keys reads values of its own, written one SET each and interleaved
//     with imgcache's (setRaw).
//
// Both are shown because an MGET's time depends on where Redis allocated its values, and two sets of
// keys never have the same layout: on the reference machine, two copies of the same 100 values
// written at the same time took an MGET anywhere from 0.6x to 1.5x each other's time, and which was
// faster changed when they were rewritten. go-redis/cache has no batch read. ns/key is the time per
// key.
func BenchmarkGetMany(b *testing.B) {
	rdb := redisClient(b)
	ic, peers := getManyPeers(b, rdb)
	for _, g := range goroutineCounts(1, 64) {
		for _, p := range peers {
			b.Run(fmt.Sprintf("g=%d/%s", g, p.name), func(b *testing.B) {
				countCommands(b, rdb, func() { drive(b, g, p.get) })
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batchSize), "ns/key")
			})
		}
	}
	if n := ic.Stats().L2Errors; n > 0 {
		b.Errorf("imgcache counted %d Redis errors", n)
	}
}

// getManyPeers stores the hit keys in Redis for imgcache (with no L1) and the own-keys floor, and
// returns the batch reads of imgcache and of the two floors, in that order: get(j) reads batch j
// (mod the number of batches).
func getManyPeers(b *testing.B, rdb *redis.Client) (*imgcache.Cache[meta], []peer) {
	ks := hitSet()
	ctx := context.Background()
	ic := newImgcache(b, rdb, -1)
	for i, k := range ks.Keys {
		if err := ic.Set(ctx, k, ks.Metas[i]); err != nil {
			b.Fatal(err)
		}
		setRaw(b, rdb, ks, i)
	}
	batches := len(ks.Keys) / batchSize
	same, raw := make([][]string, batches), make([][]string, batches)
	for j := range raw {
		for i := j * batchSize; i < (j+1)*batchSize; i++ {
			same[j] = append(same[j], imgcacheRedisKey(ks.Keys[i]))
			raw[j] = append(raw[j], rawKey(ks.Strs[i]))
		}
	}
	mgetDecode := func(keys []string, payload func([]byte) ([]byte, bool)) bool {
		vals, err := rdb.MGet(ctx, keys...).Result()
		if err != nil {
			return false
		}
		ms := make([]meta, len(vals)) // the batch's values, as GetMany returns them
		for i, v := range vals {
			s, ok := v.(string)
			if !ok {
				return false
			}
			data, ok := payload([]byte(s))
			if !ok || ms[i].UnmarshalBinary(data) != nil {
				return false
			}
		}
		return true
	}
	whole := func(data []byte) ([]byte, bool) { return data, true }
	return ic, []peer{
		{"imgcache-GetMany", func(j int) bool {
			j %= batches
			_, found, err := ic.GetMany(ctx, ks.Keys[j*batchSize:(j+1)*batchSize])
			if err != nil {
				return false
			}
			for _, f := range found {
				if !f {
					return false
				}
			}
			return true
		}},
		{"go-redis-MGET+decode", func(j int) bool { return mgetDecode(same[j%batches], envelopePayload) }},
		{"go-redis-MGET+decode-own-keys", func(j int) bool { return mgetDecode(raw[j%batches], whole) }},
	}
}

// imgcacheRedisKey is the Redis key of k's value in newImgcache's caches: the namespace, a colon and
// the key's String form (README, "Keys").
func imgcacheRedisKey(k imgcache.Key) string { return "bench" + run + ":" + k.String() }

// envelopePayload returns the payload of a value imgcache wrote with no tags: its envelope is a
// 15-byte header (magic, version, flags, codec, expiry), the entity's generation and the number of
// tags (0) as uvarints, then the payload (imgcache's codec.go).
func envelopePayload(data []byte) ([]byte, bool) {
	const header = 15
	if len(data) < header {
		return nil, false
	}
	rest := data[header:]
	if _, n := binary.Uvarint(rest); n > 0 {
		rest = rest[n:]
	} else {
		return nil, false
	}
	if tags, n := binary.Uvarint(rest); n == 1 && tags == 0 {
		return rest[n:], true
	}
	return nil, false
}

// BenchmarkGetOrLoadHit: GetOrLoad (go-redis/cache: Once) of a key that is cached. "l1" rows hit
// the local level; "l2" rows have none (imgcache L1Size -1, go-redis/cache without LocalCache) and
// hit Redis.
func BenchmarkGetOrLoadHit(b *testing.B) {
	rdb := maybeRedis(b)
	var loads atomic.Int64
	level := func(name string, ic *imgcache.Cache[meta], grc *rediscache.Cache) {
		peers := getOrLoadPeers(b, context.Background(), ic, grc, &loads)
		for _, p := range peers {
			b.Run(name+"/g=1/"+p.name, func(b *testing.B) {
				if rdb != nil {
					countCommands(b, rdb, func() { drive(b, 1, p.get) })
				} else {
					drive(b, 1, p.get)
				}
			})
		}
		if n := loads.Load(); n > 0 {
			b.Fatalf("%s: %d loads during the hit benchmarks", name, n)
		}
	}
	level("l1", newImgcache(b, rdb, L1Capacity), newGoRedisCache(rdb, true, false))
	if rdb != nil {
		level("l2", newImgcache(b, rdb, -1), newGoRedisCache(rdb, false, false))
	}
}

// getOrLoadPeers fills imgcache and go-redis/cache with the hit keys through their GetOrLoad (Once)
// and returns those calls, imgcache's first; a load after the fill adds to loads.
func getOrLoadPeers(b *testing.B, ctx context.Context, ic *imgcache.Cache[meta], grc *rediscache.Cache, loads *atomic.Int64) []peer {
	ks := hitSet()
	icGet := func(i int) bool {
		_, err := ic.GetOrLoad(ctx, ks.Keys[i], func(context.Context) (meta, error) {
			loads.Add(1)
			return ks.Metas[i], nil
		})
		return err == nil
	}
	grcGet := func(i int) bool {
		var m meta
		return grc.Once(&rediscache.Item{Ctx: ctx, Key: grcKey(ks.Strs[i]), Value: &m, TTL: time.Hour,
			Do: func(*rediscache.Item) (any, error) { loads.Add(1); return ks.Metas[i], nil }}) == nil
	}
	for i := range hitKeys {
		if !icGet(i) || !grcGet(i) {
			b.Fatal("GetOrLoad failed")
		}
	}
	loads.Store(0)
	return []peer{{"imgcache", icGet}, {"go-redis-cache", grcGet}}
}

// grcLoad is go-redis/cache's GetOrLoad of s, a miss: Once with a loader that returns value.
func grcLoad(ctx context.Context, c *rediscache.Cache, s string, value meta) error {
	var m meta
	return c.Once(&rediscache.Item{Ctx: ctx, Key: grcKey(s), Value: &m, TTL: 5 * time.Minute,
		Do: func(*rediscache.Item) (any, error) { return value, nil }})
}

// missKeys returns n keys never used before in this process.
var missSeq atomic.Int64

func missKeys(n int) ([]imgcache.Key, []string) {
	first := int(missSeq.Add(int64(n))) - n
	keys := make([]imgcache.Key, n)
	strs := make([]string, n)
	for i := range keys {
		keys[i] = imgcache.NewKey("miss", strconv.Itoa(first+i)).With("type", "avatar").With("size", "512")
		strs[i] = keys[i].String()
	}
	return keys, strs
}

// BenchmarkMissLoad: GetOrLoad of a key no level has, a trivial loader, and the store. Keys are
// built before the timer starts. "redis" rows store in both levels; "local" rows have no Redis.
func BenchmarkMissLoad(b *testing.B) {
	ctx := context.Background()
	value := Meta(1)
	load := func(context.Context) (meta, error) { return value, nil }
	type missPeer struct {
		name string
		get  func(k imgcache.Key, s string) error
	}
	bench := func(name string, rdb *redis.Client, get func(k imgcache.Key, s string) error) {
		b.Run(name, func(b *testing.B) {
			keys, strs := missKeys(b.N)
			b.ReportAllocs()
			b.ResetTimer()
			body := func() {
				for i := 0; i < b.N; i++ {
					if err := get(keys[i], strs[i]); err != nil {
						b.Fatal(err)
					}
				}
			}
			if rdb != nil {
				countCommands(b, rdb, body)
			} else {
				body()
			}
		})
	}
	grcOnce := func(c *rediscache.Cache) func(imgcache.Key, string) error {
		return func(_ imgcache.Key, s string) error { return grcLoad(ctx, c, s, value) }
	}

	// In process only.
	icLocal := newImgcache(b, nil, L1Capacity)
	grcLocal := newGoRedisCache(nil, true, false)
	ot := otter.Must(&otter.Options[string, meta]{MaximumSize: L1Capacity})
	otLoad := otter.LoaderFunc[string, meta](func(context.Context, string) (meta, error) { return value, nil })
	st := sturdyc.New[meta](L1Capacity, 10, time.Minute, 10)
	for _, p := range []missPeer{
		{"imgcache", func(k imgcache.Key, _ string) error { _, err := icLocal.GetOrLoad(ctx, k, load); return err }},
		{"go-redis-cache", grcOnce(grcLocal)},
		{"otter", func(_ imgcache.Key, s string) error { _, err := ot.Get(ctx, s, otLoad); return err }},
		{"sturdyc", func(_ imgcache.Key, s string) error { _, err := st.GetOrFetch(ctx, s, load); return err }},
	} {
		bench("local/g=1/"+p.name, nil, p.get)
	}

	if redisAddr == "" {
		return
	}
	rdb := redisClient(b)
	ic := newImgcache(b, rdb, L1Capacity)
	grc := newGoRedisCache(rdb, true, false)
	for _, p := range []missPeer{
		{"imgcache", func(k imgcache.Key, _ string) error { _, err := ic.GetOrLoad(ctx, k, load); return err }},
		{"go-redis-cache", grcOnce(grc)},
	} {
		bench("redis/g=1/"+p.name, rdb, p.get)
	}
	if n := ic.Stats().L2Errors; n > 0 {
		b.Errorf("imgcache counted %d Redis errors", n)
	}
}

// zipfTraceLen is the length of the mixed workload's trace; runs go on from where the last
// one stopped, and wrap around.
const zipfTraceLen = 1 << 21

// zipfWorkload is the mixed workload's keys, values and trace, built once.
var zipfWorkload = sync.OnceValue(func() struct {
	ks    *KeySet
	trace []int32
} {
	return struct {
		ks    *KeySet
		trace []int32
	}{NewKeySet(0, ZipfKeys), ZipfTrace(zipfTraceLen, ZipfKeys, ZipfS, 7)}
})

// BenchmarkZipfMixed: 64 goroutines call GetOrLoad on keys drawn from Zipf (s=1.1) over 100,000
// keys, through an L1 of 10,000 over a real Redis. Each cache first loads every key once, so that
// Redis holds them all whatever each cache's history (a load-heavy cold start would otherwise
// depend on how many calibration runs the testing package made), then warms L1 with 100,000
// lookups; every run then goes on along the trace (each goroutine a contiguous stretch of it), so
// no run replays an earlier one's draws. The mix is L1 hits and L2 hits; loads/op shows any miss.
// ns/op is wall time over all lookups: the inverse of throughput.
func BenchmarkZipfMixed(b *testing.B) {
	rdb := redisClient(b)
	w := zipfWorkload()
	ks, trace := w.ks, w.trace
	ctx := context.Background()
	g := goroutineCounts(64)[0]
	var loads atomic.Int64
	// byID: get of position i reads trace[i]; prefill calls it with ids, through idMode.
	var idMode atomic.Bool
	keyAt := func(i int) int32 {
		if idMode.Load() {
			return int32(i)
		}
		return trace[i%zipfTraceLen]
	}
	parallelKeys := func(g, n int, get func(int) error) error {
		idMode.Store(true)
		defer idMode.Store(false)
		var next atomic.Int64
		var errs atomic.Int64
		var wg sync.WaitGroup
		for range g {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
					if get(i) != nil {
						errs.Add(1)
					}
				}
			}()
		}
		wg.Wait()
		if errs.Load() > 0 {
			return fmt.Errorf("%d errors", errs.Load())
		}
		return nil
	}

	ic := newImgcache(b, rdb, L1Capacity)
	icGet := func(i int) error {
		id := keyAt(i)
		_, err := ic.GetOrLoad(ctx, ks.Keys[id], func(context.Context) (meta, error) {
			loads.Add(1)
			return ks.Metas[id], nil
		})
		return err
	}
	grc := newGoRedisCache(rdb, true, false)
	grcGet := func(i int) error {
		id := keyAt(i)
		var m meta
		return grc.Once(&rediscache.Item{Ctx: ctx, Key: grcKey(ks.Strs[id]), Value: &m, TTL: 5 * time.Minute,
			Do: func(*rediscache.Item) (any, error) { loads.Add(1); return ks.Metas[id], nil }})
	}
	// parallel runs trace positions [*cursor, *cursor+n) on g goroutines, a stretch each.
	parallel := func(get func(int) error, n int, cursor *int) error {
		var errs atomic.Int64
		var first atomic.Value
		var wg sync.WaitGroup
		start := *cursor
		for j := range g {
			per := n / g
			if j < n%g {
				per++
			}
			wg.Add(1)
			go func(from int) {
				defer wg.Done()
				for i := from; i < from+per; i++ {
					if err := get(i); err != nil {
						errs.Add(1)
						first.CompareAndSwap(nil, err)
					}
				}
			}(start)
			start += per
		}
		wg.Wait()
		*cursor = start
		if errs.Load() > 0 {
			return fmt.Errorf("%d errors, first: %v", errs.Load(), first.Load())
		}
		return nil
	}
	for _, p := range []struct {
		name string
		get  func(int) error
	}{{"imgcache", icGet}, {"go-redis-cache", grcGet}} {
		// Prefill: every key once, through the cache's own GetOrLoad, so that Redis holds them all
		// and the comparison does not hang on how much history each cache had; then a Zipf warm-up
		// shapes L1.
		t0 := time.Now()
		if err := parallelKeys(g, ZipfKeys, p.get); err != nil {
			b.Fatalf("%s prefill: %v", p.name, err)
		}
		cursor := 0 // both caches see the same draws in the same order
		if err := parallel(p.get, 100_000, &cursor); err != nil {
			b.Fatalf("%s warm-up: %v", p.name, err)
		}
		b.Logf("%s: prefill and warm-up took %v", p.name, time.Since(t0))
		b.Run(fmt.Sprintf("g=%d/%s", g, p.name), func(b *testing.B) {
			var st0 imgcache.Stats
			if p.name == "imgcache" {
				st0 = ic.Stats()
			}
			loads.Store(0)
			b.ReportAllocs()
			b.ResetTimer()
			countCommands(b, rdb, func() {
				if err := parallel(p.get, b.N, &cursor); err != nil {
					b.Fatal(err)
				}
			})
			b.StopTimer()
			b.ReportMetric(float64(loads.Load())/float64(b.N), "loads/op")
			if p.name == "imgcache" {
				st := ic.Stats()
				b.ReportMetric(100*float64(st.L1Hits-st0.L1Hits)/float64(b.N), "l1hit%")
				if st.L2Errors > st0.L2Errors {
					b.ReportMetric(float64(st.L2Errors-st0.L2Errors)/float64(b.N), "l2errors/op")
				}
			}
		})
	}
}
