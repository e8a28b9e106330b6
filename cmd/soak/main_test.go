package main

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
)

// TestSoakRun runs a short soak, on miniredis or on the Redis at IMGCACHE_REDIS_ADDR, so that the
// program keeps working: the workload, the sampler, the teardown, the cleanup and the verdict.
func TestSoakRun(t *testing.T) {
	addr := os.Getenv("IMGCACHE_REDIS_ADDR")
	var mr *miniredis.Miniredis
	if addr == "" {
		mr = miniredis.RunT(t)
		addr = mr.Addr()
	}
	// Small enough to take about 4 s under -race (miniredis runs its Lua in Go, slowly). The heap
	// limit is loose here: miniredis keeps its keys in this process's heap, which grows as the
	// workload writes new keys. TestSoakVerdict tests the verdict; the 60 s run is the measurement.
	cfg := config{
		duration: 3 * time.Second, interval: 250 * time.Millisecond, window: time.Second,
		redisAddr: addr, goroutines: 4, keys: 1000, l1: 100, zipfS: 1.1, maxGrowth: 1,
	}
	if mr != nil { // miniredis serves each connection with two goroutines: servePeer and its reader
		cfg.serverGoroutines = func() int { return 2 * mr.CurrentConnectionCount() }
	}
	var out bytes.Buffer
	res, err := run(context.Background(), cfg, &out)
	t.Logf("output:\n%s", out.String())
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	if got, want := len(res.samples), 12; got < want-1 || got > want {
		t.Errorf("got %d samples, want %d", got, want)
	}
	var total uint64
	for _, n := range res.ops {
		total += n
	}
	if total == 0 || res.ops[opGet] == 0 || res.ops[opSet] == 0 {
		t.Errorf("got ops %v, want some of each common kind", res.ops)
	}
	if res.goroutinesAfter > res.goroutinesBefore {
		t.Errorf("got %d goroutines after Close, want at most %d", res.goroutinesAfter, res.goroutinesBefore)
	}
	if res.keysRemoved == 0 || res.keysLeft != 0 {
		t.Errorf("cleanup: got %d keys removed and %d left, want some and 0", res.keysRemoved, res.keysLeft)
	}
	if mr != nil {
		for _, k := range mr.Keys() {
			if strings.HasPrefix(k, "soak_") {
				t.Errorf("key %q left in Redis", k)
				break
			}
		}
	}
	if len(res.failures) > 0 || !strings.Contains(out.String(), "PASS: heap flat") {
		t.Errorf("got failures %q, want none", res.failures)
	}
}

func TestSoakVerdict(t *testing.T) {
	cfg := config{duration: 6 * time.Second, interval: time.Second, window: 2 * time.Second, maxGrowth: 0.10}
	const mb = 1 << 20
	samples := func(heap []uint64, goroutines []int) []sample {
		ss := make([]sample, len(heap))
		for i := range ss {
			ss[i] = sample{at: time.Duration(i+1) * time.Second, heapAlloc: heap[i], goroutines: goroutines[i]}
		}
		return ss
	}
	flatG := []int{20, 21, 20, 22, 20, 21}
	for _, tc := range []struct {
		name          string
		samples       []sample
		before, after int
		want          string // in the only failure; "" for none
	}{
		{"flat", samples([]uint64{40 * mb, 41 * mb, 40 * mb, 42 * mb, 41 * mb, 43 * mb}, flatG), 3, 3, ""},
		{"small heap, growth under the 1 MiB floor", samples([]uint64{5 * mb, 5 * mb, 5 * mb, 5 * mb, 5*mb + mb/2, 6 * mb}, flatG), 3, 3, ""},
		{"heap grows", samples([]uint64{40 * mb, 41 * mb, 44 * mb, 46 * mb, 48 * mb, 50 * mb}, flatG), 3, 3, "heap grew"},
		{"goroutines grow", samples([]uint64{40 * mb, 40 * mb, 40 * mb, 40 * mb, 40 * mb, 40 * mb}, []int{20, 21, 24, 26, 28, 30}), 3, 3, "goroutines grew"},
		{"goroutine left after Close", samples([]uint64{40 * mb, 40 * mb, 40 * mb, 40 * mb, 40 * mb, 40 * mb}, flatG), 3, 4, "leaked"},
		{"too few samples", samples([]uint64{40 * mb, 40 * mb, 40 * mb}, flatG[:3]), 3, 3, "too few"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := verdict(cfg, tc.samples, tc.before, tc.after)
			switch {
			case tc.want == "" && len(got) != 0:
				t.Errorf("got %q, want no failure", got)
			case tc.want != "" && (len(got) != 1 || !strings.Contains(got[0], tc.want)):
				t.Errorf("got %q, want one failure containing %q", got, tc.want)
			}
		})
	}
}
