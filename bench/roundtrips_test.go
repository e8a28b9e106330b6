package bench

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// BenchmarkMissRoundTrips splits a miss + load into its round trips. imgcache's GetOrLoad and
// go-redis/cache's Once run on new keys in turn, on one client whose hook times every command and
// pipeline it sends, and each round trip's median time is reported:
//
//	register-us   imgcache's first round trip: the registration script, the lease's SET NX, the
//	              read of the value and of the pattern epoch (a miss-heavy instance skips the
//	              plain read before it: see speculate in getorload.go)
//	write-us      its second: the SET, the checks of the epochs, the lease's release script
//	peer-get-us   go-redis/cache's GET, which misses
//	peer-set-us   its SET
//
// Every round trip carries the same loopback latency; the difference between a pair is what the
// extra commands cost Redis and the client.
//
//	REDIS_ADDR=127.0.0.1:6379 go test -run '^$' -bench MissRoundTrips -benchtime 5000x -count 6 .
func BenchmarkMissRoundTrips(b *testing.B) {
	if redisAddr == "" {
		b.Skip("REDIS_ADDR is not set")
	}
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr, ContextTimeoutEnabled: true})
	b.Cleanup(func() { _ = rdb.Close() }) // after the caches' cleanups: they give connections back
	timer := &roundTripTimer{}
	rdb.AddHook(timer)
	ic := newImgcache(b, rdb, L1Capacity)
	grc := newGoRedisCache(rdb, true, false)
	ctx := context.Background()
	value := Meta(1)
	load := func(context.Context) (meta, error) { return value, nil }
	warm, _ := missKeys(16) // enough misses for the instance to speculate, as in the paired row
	for _, k := range warm {
		if _, err := ic.GetOrLoad(ctx, k, load); err != nil {
			b.Fatal(err)
		}
	}
	icKeys, _ := missKeys(b.N)
	_, grcStrs := missKeys(b.N)
	timer.reset()
	b.ResetTimer()
	for i := range b.N {
		if _, err := ic.GetOrLoad(ctx, icKeys[i], load); err != nil {
			b.Fatal(err)
		}
		if err := grcLoad(ctx, grc, grcStrs[i], value); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	for name, sig := range map[string]func(string) bool{
		"register-us": func(s string) bool { return strings.Contains(s, "evalsha") && strings.HasPrefix(s, "mget ") },
		"write-us":    func(s string) bool { return strings.Contains(s, "evalsha") && strings.HasPrefix(s, "set ") },
		"peer-get-us": func(s string) bool { return s == "get" },
		"peer-set-us": func(s string) bool { return s == "set" },
	} {
		d, n := timer.median(sig)
		if n < b.N/2 {
			b.Fatalf("%s: %d round trips for %d misses", name, n, b.N)
		}
		b.ReportMetric(float64(d)/float64(time.Microsecond), name)
	}
}

// roundTripTimer is a go-redis hook that records how long each command or pipeline took, by the
// names of its commands.
type roundTripTimer struct {
	mu sync.Mutex
	d  map[string][]time.Duration
}

func (t *roundTripTimer) DialHook(next redis.DialHook) redis.DialHook { return next }

func (t *roundTripTimer) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		start := time.Now()
		err := next(ctx, cmd)
		t.add(cmd.Name(), time.Since(start))
		return err
	}
}

func (t *roundTripTimer) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		start := time.Now()
		err := next(ctx, cmds)
		names := make([]string, len(cmds))
		for i, c := range cmds {
			names[i] = c.Name()
		}
		t.add(strings.Join(names, " "), time.Since(start))
		return err
	}
}

func (t *roundTripTimer) add(sig string, d time.Duration) {
	t.mu.Lock()
	if t.d == nil {
		t.d = map[string][]time.Duration{}
	}
	t.d[sig] = append(t.d[sig], d)
	t.mu.Unlock()
}

func (t *roundTripTimer) reset() {
	t.mu.Lock()
	t.d = nil
	t.mu.Unlock()
}

// median returns the median time of the round trips whose signatures match, and their number.
func (t *roundTripTimer) median(match func(string) bool) (time.Duration, int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var all []time.Duration
	for sig, ds := range t.d {
		if match(sig) {
			all = append(all, ds...)
		}
	}
	if len(all) == 0 {
		return 0, 0
	}
	slices.Sort(all)
	return all[len(all)/2], len(all)
}
