package bench

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"time"

	rediscache "github.com/go-redis/cache/v9"
	arc "github.com/hashicorp/golang-lru/arc/v2"
	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/imgcache/imgcache"
	"github.com/maypok86/otter/v2"
	"github.com/viccon/sturdyc"
)

// The hit-ratio simulation replays a trace of key ids through each policy, single-threaded, with
// get-then-set-on-miss, and counts hits over every lookup (the cold start included, alike for all).

// TraceKeys holds the key of every id a trace uses.
type TraceKeys struct {
	Keys []imgcache.Key
	Strs []string
}

// NewTraceKeys builds the keys of ids 0..n-1.
func NewTraceKeys(n int) *TraceKeys {
	tk := &TraceKeys{Keys: make([]imgcache.Key, n), Strs: make([]string, n)}
	for i := range n {
		tk.Keys[i], tk.Strs[i] = Key(i)
	}
	return tk
}

// Policy is one cache replayed by the simulation.
type Policy struct {
	Name string
	// Run replays trace through a cache of size entries and returns the number of hits.
	Run func(size int, trace []int32, keys *TraceKeys) (int, error)
}

var simValue = Meta(1)

// Policies returns the policies compared, Belady's optimum last.
func Policies() []Policy {
	return []Policy{
		{"imgcache L1 (default, PolicyAuto)", func(size int, trace []int32, keys *TraceKeys) (int, error) {
			return runImgcache(size, imgcache.PolicyAuto, trace, keys)
		}},
		{"imgcache L1, PolicyLRU", func(size int, trace []int32, keys *TraceKeys) (int, error) {
			return runImgcache(size, imgcache.PolicyLRU, trace, keys)
		}},
		{"imgcache L1, PolicyTinyLFU", func(size int, trace []int32, keys *TraceKeys) (int, error) {
			return runImgcache(size, imgcache.PolicyTinyLFU, trace, keys)
		}},
		{"golang-lru LRU", runLRU},
		{"golang-lru 2Q", run2Q},
		{"golang-lru ARC", runARC},
		{"otter", runOtter},
		{"go-redis/cache TinyLFU", runTinyLFU},
		{"sturdyc", runSturdyc},
		{"Belady (optimal, with bypass)", func(size int, trace []int32, _ *TraceKeys) (int, error) {
			return Belady(size, trace), nil
		}},
	}
}

// runImgcache counts imgcache's own L1 hits (Stats.L1Hits) with no Redis: Get, and Set on a miss.
// PolicyAuto, the default, is PolicyTinyLFU from 1,000 entries up and PolicyLRU below.
func runImgcache(size int, policy imgcache.Policy, trace []int32, keys *TraceKeys) (int, error) {
	c, err := imgcache.New[imgcache.ImageMeta](imgcache.Options{L1Size: size, L1Policy: policy, L1TTL: time.Hour, TTL: time.Hour})
	if err != nil {
		return 0, err
	}
	defer c.Close()
	ctx := context.Background()
	got := 0
	for _, id := range trace {
		k := keys.Keys[id]
		_, err := c.Get(ctx, k)
		switch {
		case err == nil:
			got++
		case errors.Is(err, imgcache.ErrNotFound):
			if err := c.Set(ctx, k, simValue); err != nil {
				return 0, err
			}
		default:
			return 0, err
		}
	}
	hits := int(c.Stats().L1Hits)
	if hits != got {
		return 0, fmt.Errorf("imgcache: Stats.L1Hits is %d, but %d Gets succeeded", hits, got)
	}
	return hits, nil
}

// replay runs a trace through a cache given as its lookup and insert: a hit counts, a miss inserts.
func replay(trace []int32, keys *TraceKeys, get func(string) bool, add func(string)) int {
	hits := 0
	for _, id := range trace {
		k := keys.Strs[id]
		if get(k) {
			hits++
		} else {
			add(k)
		}
	}
	return hits
}

func runLRU(size int, trace []int32, keys *TraceKeys) (int, error) {
	c, err := lru.New[string, int](size)
	if err != nil {
		return 0, err
	}
	return replay(trace, keys, func(k string) bool { _, ok := c.Get(k); return ok }, func(k string) { c.Add(k, 1) }), nil
}

func run2Q(size int, trace []int32, keys *TraceKeys) (int, error) {
	c, err := lru.New2Q[string, int](size)
	if err != nil {
		return 0, err
	}
	return replay(trace, keys, func(k string) bool { _, ok := c.Get(k); return ok }, func(k string) { c.Add(k, 1) }), nil
}

func runARC(size int, trace []int32, keys *TraceKeys) (int, error) {
	c, err := arc.NewARC[string, int](size)
	if err != nil {
		return 0, err
	}
	return replay(trace, keys, func(k string) bool { _, ok := c.Get(k); return ok }, func(k string) { c.Add(k, 1) }), nil
}

func runOtter(size int, trace []int32, keys *TraceKeys) (int, error) {
	c, err := otter.New(&otter.Options[string, int]{MaximumSize: size, Executor: func(fn func()) { fn() }})
	if err != nil {
		return 0, err
	}
	defer c.StopAllGoroutines()
	hits := 0
	for _, id := range trace {
		k := keys.Strs[id]
		if _, ok := c.GetIfPresent(k); ok {
			hits++
		} else {
			c.Set(k, 1)
		}
	}
	return hits, nil
}

// runTinyLFU is go-redis/cache's local cache, as cache.Options.LocalCache gets it.
func runTinyLFU(size int, trace []int32, keys *TraceKeys) (int, error) {
	c := rediscache.NewTinyLFU(size, time.Hour)
	v := []byte("v")
	hits := 0
	for _, id := range trace {
		k := keys.Strs[id]
		if _, ok := c.Get(k); ok {
			hits++
		} else {
			c.Set(k, v)
		}
	}
	return hits, nil
}

// runSturdyc: sturdyc evicts, when a shard is full, the 10% of its entries that expire first
// (with one TTL for all: the oldest), so it behaves as a batched FIFO.
func runSturdyc(size int, trace []int32, keys *TraceKeys) (int, error) {
	c := sturdyc.New[int](size, 10, time.Hour, 10, sturdyc.WithNoContinuousEvictions())
	hits := 0
	for _, id := range trace {
		k := keys.Strs[id]
		if _, ok := c.Get(k); ok {
			hits++
		} else {
			c.Set(k, 1)
		}
	}
	return hits, nil
}

// Belady returns the hits of Belady's MIN on trace with a cache of size entries, in the variant
// that may decline to admit a key (bypass): on a miss with the cache full, of the cached keys and
// the new one, the one used again farthest in the future is left out. It is the optimum for any
// policy that can refuse admission, as TinyLFU-based ones do, and so an upper bound for all here.
func Belady(size int, trace []int32) int {
	const never = int32(1<<31 - 1)
	maxID := int32(0)
	for _, id := range trace {
		maxID = max(maxID, id)
	}
	next := make([]int32, len(trace))
	last := make([]int32, maxID+1)
	for i := range last {
		last[i] = never
	}
	for i := len(trace) - 1; i >= 0; i-- {
		next[i] = last[trace[i]]
		last[trace[i]] = int32(i)
	}
	cached := last // reuse: the next use of each cached id, or -1 when not cached
	for i := range cached {
		cached[i] = -1
	}
	h := &useHeap{}
	n, hits := 0, 0
	for i, id := range trace {
		nu := next[i]
		if cached[id] >= 0 {
			hits++
			cached[id] = nu
			heap.Push(h, use{nu, id})
			continue
		}
		if nu == never {
			continue // never used again: not worth a slot
		}
		if n < size {
			n++
			cached[id] = nu
			heap.Push(h, use{nu, id})
			continue
		}
		for { // drop heap entries that no longer describe a cached id
			top := (*h)[0]
			if cached[top.id] == top.next {
				break
			}
			heap.Pop(h)
		}
		if top := (*h)[0]; top.next > nu {
			heap.Pop(h)
			cached[top.id] = -1
			cached[id] = nu
			heap.Push(h, use{nu, id})
		}
	}
	return hits
}

type use struct{ next, id int32 }

type useHeap []use // max-heap by next use

func (h useHeap) Len() int           { return len(h) }
func (h useHeap) Less(i, j int) bool { return h[i].next > h[j].next }
func (h useHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *useHeap) Push(x any)        { *h = append(*h, x.(use)) }
func (h *useHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// SimResult is one policy's hits on one trace at one size.
type SimResult struct {
	Trace   string
	Policy  string
	Size    int
	Hits    int
	Lookups int
}

// Ratio is hits over lookups.
func (r SimResult) Ratio() float64 { return float64(r.Hits) / float64(r.Lookups) }

// Trace is a named trace and the keys of its ids.
type Trace struct {
	Name string
	IDs  []int32
	Keys *TraceKeys
}

// Simulate runs every policy on every trace at every size, GOMAXPROCS replays at a time (each
// replay is single-threaded and owns its cache, so the results do not depend on the others).
func Simulate(traces []Trace, policies []Policy, sizes []int) ([]SimResult, error) {
	type job struct {
		t    Trace
		p    Policy
		size int
		i    int
	}
	var jobs []job
	for _, t := range traces {
		for _, p := range policies {
			for _, s := range sizes {
				jobs = append(jobs, job{t, p, s, len(jobs)})
			}
		}
	}
	res := make([]SimResult, len(jobs))
	errs := make([]error, len(jobs))
	ch := make(chan job)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range ch {
				hits, err := j.p.Run(j.size, j.t.IDs, j.t.Keys)
				res[j.i] = SimResult{Trace: j.t.Name, Policy: j.p.Name, Size: j.size, Hits: hits, Lookups: len(j.t.IDs)}
				if err != nil {
					errs[j.i] = fmt.Errorf("%s, %s, size %d: %w", j.t.Name, j.p.Name, j.size, err)
				}
			}
		}()
	}
	for _, j := range jobs {
		ch <- j
	}
	close(ch)
	wg.Wait()
	return res, errors.Join(errs...)
}
