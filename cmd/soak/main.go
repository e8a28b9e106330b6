// Command soak runs a mixed workload on a Cache[ImageMeta] for a bounded time and checks that the
// process's heap stays flat and that no goroutine leaks.
//
//	go run ./cmd/soak -duration 60s                # on the Redis at 127.0.0.1:6379
//	go run ./cmd/soak -duration 60s -redis ''      # L1 only
//
// It fills L1 first (Set of the -l1 hottest keys), so that the heap is at its steady state when the
// measurement starts, then runs -goroutines workers doing Get, GetOrLoad, Set, Delete,
// InvalidateEntity and InvalidateTags on keys drawn from a Zipf distribution over -keys keys, for
// -duration. Every -interval it pauses the workers (each finishes the operation it is in, for up to
// 250 ms), forces a collection, samples the live heap (HeapAlloc), HeapInuse and the goroutine
// count, prints them and lets the workers go on. The pause keeps the garbage that running workers
// allocate during the collection out of the sample; anything the cache retains is in it.
//
// The verdict compares the median heap of the first -window (warm) with that of the last -window
// (end): it fails if the end is larger by more than -max-growth of the warm median, or 1 MiB if
// that is more (collections leave about that much noise on a small heap). It fails if the
// goroutines grew (the fewest in the end window above the most in the warm window), or if after
// Close and the client's Close the process has more goroutines than before the cache existed.
// The exit status is 0 when every check passes, 1 when one fails, 2 when the run could not be set up.
//
// The cache uses a namespace of its own, soak_<random>; at the end its keys, bookkeeping included,
// are removed with SCAN and UNLINK (never KEYS), also when the run is interrupted.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/imgcache/imgcache"
)

type config struct {
	duration   time.Duration // of the measured, mixed phase
	interval   time.Duration // between samples
	window     time.Duration // of the warm and end windows compared
	redisAddr  string        // "" runs L1 only
	goroutines int
	keys       int
	l1         int
	zipfS      float64
	maxGrowth  float64 // fraction of the warm median heap
	// serverGoroutines, if set, counts the goroutines of a Redis that runs in this process
	// (miniredis: two per connection), which the goroutine counts leave out. The client's pool
	// grows up to its PoolSize with the workload's peak concurrency, and each connection would
	// count as a goroutine of the process although the cache started none.
	serverGoroutines func() int
}

// minGrowth is the heap growth always allowed: forced collections still leave about this much
// difference between samples of a small, flat heap.
const minGrowth = 1 << 20

func main() {
	var cfg config
	flag.DurationVar(&cfg.duration, "duration", 60*time.Second, "how long the mixed workload runs")
	flag.DurationVar(&cfg.interval, "interval", time.Second, "time between heap samples (each after a forced GC)")
	flag.DurationVar(&cfg.window, "window", 10*time.Second, "length of the warm and end windows whose median heaps are compared")
	flag.StringVar(&cfg.redisAddr, "redis", "127.0.0.1:6379", "Redis host:port; '' runs L1 only")
	flag.IntVar(&cfg.goroutines, "goroutines", 16, "concurrent workers")
	flag.IntVar(&cfg.keys, "keys", 100_000, "distinct keys")
	flag.IntVar(&cfg.l1, "l1", 10_000, "L1 size (Options.L1Size)")
	flag.Float64Var(&cfg.zipfS, "zipf", 1.1, "Zipf exponent s (> 1) of the key distribution")
	flag.Float64Var(&cfg.maxGrowth, "max-growth", 0.10, "largest allowed heap growth from the warm to the end window, as a fraction")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	res, err := run(ctx, cfg, os.Stdout)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		os.Exit(2)
	}
	if len(res.failures) > 0 {
		os.Exit(1)
	}
}

// The workload: what each operation is, and how often, per mille. Invalidations walk all of L1 on
// the instance (and a Redis meta hash), so they are rare, as they are in a service.
type opKind int

const (
	opGet opKind = iota
	opGetOrLoad
	opSet
	opDelete
	opInvalidateEntity
	opInvalidateTags
	numOps
)

var ops = [numOps]struct {
	name     string
	perMille int
}{
	opGet:              {"Get", 570},
	opGetOrLoad:        {"GetOrLoad", 300},
	opSet:              {"Set", 100},
	opDelete:           {"Delete", 24},
	opInvalidateEntity: {"InvalidateEntity", 5},
	opInvalidateTags:   {"InvalidateTags", 1},
}

// albums is how many tags ("album:<n>") the values are spread over.
const albums = 1000

type sample struct {
	at         time.Duration // since the mixed phase began
	heapAlloc  uint64        // live heap after a forced collection
	heapInuse  uint64
	goroutines int
	ops        uint64 // done so far
	l1Entries  uint64
}

type result struct {
	samples          []sample
	goroutinesBefore int // before the client and the cache existed
	goroutinesAfter  int // after both are closed
	ops, errs        [numOps]uint64
	stats            imgcache.Stats
	keysRemoved      int
	keysLeft         int
	busySamples      int // taken with operations still running: the pause timed out
	failures         []string
}

// run sets up the cache, runs the workload and the sampler, tears everything down and prints the
// table and the verdict to out. It returns an error only when the run could not be made.
func run(ctx context.Context, cfg config, out io.Writer) (*result, error) {
	if cfg.duration < 2*cfg.window || cfg.window < cfg.interval || cfg.interval <= 0 {
		return nil, fmt.Errorf("-duration %v must be at least two -window %v, each at least one -interval %v", cfg.duration, cfg.window, cfg.interval)
	}
	if cfg.goroutines < 1 || cfg.keys < 2 || cfg.l1 < 1 || cfg.zipfS <= 1 {
		return nil, errors.New("-goroutines and -l1 must be positive, -keys at least 2, -zipf above 1")
	}
	res := &result{goroutinesBefore: runtime.NumGoroutine()}
	var b [4]byte
	_, _ = rand.Read(b[:])
	ns := "soak_" + hex.EncodeToString(b[:])

	var rdb *redis.Client
	where := "L1 only"
	if cfg.redisAddr != "" {
		rdb = redis.NewClient(&redis.Options{Addr: cfg.redisAddr, ContextTimeoutEnabled: true, PoolSize: cfg.goroutines + 8})
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := rdb.Ping(pctx).Err()
		cancel()
		if err != nil {
			_ = rdb.Close()
			return nil, fmt.Errorf("redis %s: %w", cfg.redisAddr, err)
		}
		where = "Redis " + cfg.redisAddr + " " + redisVersion(ctx, rdb)
	}
	opts := imgcache.Options{Namespace: ns, L1Size: cfg.l1}
	if rdb != nil {
		opts.Redis = rdb
	}
	c, err := imgcache.New[imgcache.ImageMeta](opts)
	if err != nil {
		if rdb != nil {
			_ = rdb.Close()
		}
		return nil, err
	}
	closed := false
	teardown := func() {
		if closed {
			return
		}
		closed = true
		res.stats = c.Stats()
		_ = c.Close()
		if rdb != nil {
			// A fresh context: the run's may have been cancelled by an interrupt.
			cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			var err error
			res.keysRemoved, res.keysLeft, err = cleanup(cctx, rdb, ns)
			cancel()
			if err != nil {
				fmt.Fprintf(out, "cleanup of %s:*: %v\n", ns, err)
			}
			_ = rdb.Close()
		}
		res.goroutinesAfter = settledGoroutines(res.goroutinesBefore, 5*time.Second)
	}
	defer teardown()

	fmt.Fprintf(out, "soak: %v of mixed ops, %d goroutines, %d keys (Zipf s=%v), L1 %d, %s, namespace %s, %s GOMAXPROCS=%d\n",
		cfg.duration, cfg.goroutines, cfg.keys, cfg.zipfS, cfg.l1, where, ns, runtime.Version(), runtime.GOMAXPROCS(0))
	mix := make([]string, 0, numOps)
	for _, o := range ops {
		mix = append(mix, fmt.Sprintf("%s %.1f%%", o.name, float64(o.perMille)/10))
	}
	fmt.Fprintf(out, "mix: %s\n", strings.Join(mix, ", "))

	start := time.Now()
	perrs, err := prefill(ctx, c, cfg)
	if err != nil {
		return nil, fmt.Errorf("prefill: %w", err)
	}
	fmt.Fprintf(out, "prefill: %d keys set in %v (%d Redis errors: the L1 copies stay), L1 holds %d\n\n",
		min(cfg.l1, cfg.keys), time.Since(start).Round(time.Millisecond), perrs, c.Stats().L1Entries)

	wctx, stopWorkers := context.WithCancel(ctx)
	defer stopWorkers()
	var done atomic.Uint64
	var counts [numOps]atomic.Uint64
	var errCounts [numOps]atomic.Uint64
	var lastErr atomic.Value
	var gate pauser
	var wg sync.WaitGroup
	for w := range cfg.goroutines {
		wg.Go(func() {
			r := mrand.New(mrand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			z := mrand.NewZipf(r, cfg.zipfS, 1, uint64(cfg.keys-1))
			for wctx.Err() == nil {
				op := pickOp(r)
				gate.enter()
				err := do(wctx, c, op, int(z.Uint64()), r)
				gate.leave()
				counts[op].Add(1)
				done.Add(1)
				if err != nil && wctx.Err() == nil {
					errCounts[op].Add(1)
					lastErr.Store(fmt.Sprintf("%s: %v", ops[op].name, err))
				}
			}
		})
	}

	fmt.Fprintf(out, "%8s %12s %12s %10s %10s %8s\n", "t", "heap_alloc", "heap_inuse", "goroutines", "ops/s", "l1")
	t0 := time.Now()
	tick := time.NewTicker(cfg.interval)
	var prevOps uint64
	prevAt := time.Duration(0)
	for interrupted := false; !interrupted; {
		select {
		case <-tick.C:
		case <-ctx.Done():
			interrupted = true
		}
		if interrupted {
			break
		}
		at := time.Since(t0)
		quiet := gate.pause(maxPause)
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		s := sample{at: at, heapAlloc: ms.HeapAlloc, heapInuse: ms.HeapInuse, goroutines: cfg.ownGoroutines(),
			ops: done.Load(), l1Entries: c.Stats().L1Entries}
		gate.resume()
		if !quiet {
			res.busySamples++
		}
		res.samples = append(res.samples, s)
		rate := float64(s.ops-prevOps) / (at - prevAt).Seconds()
		prevOps, prevAt = s.ops, at
		fmt.Fprintf(out, "%8s %12s %12s %10d %10.0f %8d\n", at.Round(100*time.Millisecond), mib(s.heapAlloc), mib(s.heapInuse), s.goroutines, rate, s.l1Entries)
		if at >= cfg.duration-cfg.interval/2 {
			break
		}
	}
	tick.Stop()
	stopWorkers()
	wg.Wait()
	for i := range res.ops {
		res.ops[i], res.errs[i] = counts[i].Load(), errCounts[i].Load()
	}
	teardown()
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("interrupted after %v: %w", time.Since(t0).Round(time.Second), err)
	}

	res.failures = verdict(cfg, res.samples, res.goroutinesBefore, res.goroutinesAfter)
	if done.Load() == 0 {
		res.failures = append(res.failures, "no operation completed")
	}
	report(out, cfg, res, lastErr.Load())
	return res, nil
}

// prefill sets the min(l1, keys) hottest keys (the Zipf ranks 0, 1, ...), so that L1 is full and
// the heap at its steady state before the first sample. A Set whose Redis part fails (a timeout on
// a busy machine) still fills L1; those are counted.
func prefill(ctx context.Context, c *imgcache.Cache[imgcache.ImageMeta], cfg config) (redisErrors uint64, err error) {
	n := min(cfg.l1, cfg.keys)
	var next atomic.Int64
	var errs atomic.Uint64
	var wg sync.WaitGroup
	for range cfg.goroutines {
		wg.Go(func() {
			for i := int(next.Add(1)) - 1; i < n && ctx.Err() == nil; i = int(next.Add(1)) - 1 {
				if c.Set(ctx, key(i), meta(i), imgcache.WithTags(tag(i))) != nil {
					errs.Add(1)
				}
			}
		})
	}
	wg.Wait()
	return errs.Load(), ctx.Err()
}

func pickOp(r *mrand.Rand) opKind {
	n := r.IntN(1000)
	for i, o := range ops {
		if n < o.perMille {
			return opKind(i)
		}
		n -= o.perMille
	}
	return opGet
}

// do runs one operation on key rank i. A miss, and a loader's "not found", are not errors.
func do(ctx context.Context, c *imgcache.Cache[imgcache.ImageMeta], op opKind, i int, r *mrand.Rand) error {
	var err error
	switch op {
	case opGet:
		_, err = c.Get(ctx, key(i))
	case opGetOrLoad:
		_, err = c.GetOrLoad(ctx, key(i), func(context.Context) (imgcache.ImageMeta, error) {
			if artist(i)%101 == 0 {
				return imgcache.ImageMeta{}, fmt.Errorf("artist %d has no image: %w", artist(i), imgcache.ErrNotFound)
			}
			return meta(i), nil
		}, imgcache.WithTags(tag(i)))
	case opSet:
		err = c.Set(ctx, key(i), meta(i), imgcache.WithTags(tag(i)))
	case opDelete:
		err = c.Delete(ctx, key(i))
	case opInvalidateEntity:
		err = c.InvalidateEntity(ctx, "artist", strconv.Itoa(artist(i)))
	case opInvalidateTags:
		err = c.InvalidateTags(ctx, "album:"+strconv.Itoa(r.IntN(albums)))
	}
	if errors.Is(err, imgcache.ErrNotFound) {
		return nil
	}
	return err
}

// Key rank i is artist i/2's avatar (even i) or background (odd i), at size 512, tagged with one of
// the albums.
func artist(i int) int { return i/2 + 1 }

func key(i int) imgcache.Key {
	typ := "avatar"
	if i%2 == 1 {
		typ = "background"
	}
	return imgcache.NewKey("artist", strconv.Itoa(artist(i))).With("type", typ).With("size", "512")
}

func tag(i int) string { return "album:" + strconv.Itoa(artist(i)%albums) }

func meta(i int) imgcache.ImageMeta {
	id := strconv.Itoa(artist(i))
	return imgcache.ImageMeta{
		Path:     "/srv/images/artists/" + id + "/avatar.webp",
		Size:     40_000 + int64(i),
		MIMEType: "image/webp",
		Width:    512,
		Height:   512,
		ETag:     fmt.Sprintf(`"%08x-%x"`, i, 40_000+i),
		ModTime:  time.Date(2026, 3, 14, 15, 9, 26, 0, time.UTC).Add(time.Duration(i) * time.Second),
	}
}

// maxPause bounds how long the sampler waits for running operations to finish. An operation can
// take seconds when Redis stalls (a GetOrLoad waits out a load lease, up to LockTTL), and waiting
// for it would stop every worker and stretch the interval; past this the sample is taken anyway.
const maxPause = 250 * time.Millisecond

// pauser lets the sampler stop the workers between operations.
type pauser struct {
	paused   atomic.Bool
	resumed  atomic.Pointer[chan struct{}] // closed when the current pause ends
	inflight atomic.Int64
}

// enter waits out a pause, then counts an operation as running.
func (p *pauser) enter() {
	for {
		if p.paused.Load() {
			<-*p.resumed.Load()
			continue
		}
		p.inflight.Add(1)
		if !p.paused.Load() {
			return
		}
		p.inflight.Add(-1) // the pause began meanwhile: wait for it
	}
}

func (p *pauser) leave() { p.inflight.Add(-1) }

// pause stops new operations and waits up to limit for the running ones; it reports whether they
// all finished.
func (p *pauser) pause(limit time.Duration) bool {
	ch := make(chan struct{})
	p.resumed.Store(&ch)
	p.paused.Store(true)
	deadline := time.Now().Add(limit)
	for p.inflight.Load() > 0 {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(100 * time.Microsecond)
	}
	return true
}

func (p *pauser) resume() {
	ch := *p.resumed.Load()
	p.paused.Store(false)
	close(ch)
}

// windows returns the first and the last window/interval samples.
func windows(cfg config, samples []sample) (warm, end []sample, ok bool) {
	n := int(cfg.window / cfg.interval)
	if n < 1 || len(samples) < 2*n {
		return nil, nil, false
	}
	return samples[:n], samples[len(samples)-n:], true
}

// verdict returns what failed, or nothing.
func verdict(cfg config, samples []sample, before, after int) []string {
	warm, end, ok := windows(cfg, samples)
	if !ok {
		return []string{fmt.Sprintf("%d samples: too few for two windows of %v", len(samples), cfg.window)}
	}
	var failures []string
	w, e := medianHeap(warm), medianHeap(end)
	allowed := max(uint64(cfg.maxGrowth*float64(w)), minGrowth)
	if e > w+allowed {
		failures = append(failures, fmt.Sprintf("heap grew from %s to %s (median of each window), more than the %s allowed", mib(w), mib(e), mib(allowed)))
	}
	warmMax := slices.MaxFunc(warm, func(a, b sample) int { return a.goroutines - b.goroutines }).goroutines
	endMin := slices.MinFunc(end, func(a, b sample) int { return a.goroutines - b.goroutines }).goroutines
	if endMin > warmMax {
		failures = append(failures, fmt.Sprintf("goroutines grew: at least %d in the end window, at most %d in the warm one", endMin, warmMax))
	}
	if after > before {
		failures = append(failures, fmt.Sprintf("%d goroutines after Close, %d before the cache: %d leaked", after, before, after-before))
	}
	return failures
}

func medianHeap(ss []sample) uint64 {
	v := make([]uint64, len(ss))
	for i, s := range ss {
		v[i] = s.heapAlloc
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func medianInuse(ss []sample) uint64 {
	c := make([]sample, len(ss))
	for i, s := range ss {
		c[i] = sample{heapAlloc: s.heapInuse}
	}
	return medianHeap(c)
}

func report(out io.Writer, cfg config, res *result, lastErr any) {
	warm, end, ok := windows(cfg, res.samples)
	fmt.Fprintln(out)
	var total, errs uint64
	for i, o := range ops {
		fmt.Fprintf(out, "%-17s %10d ops %8d errors\n", o.name, res.ops[i], res.errs[i])
		total += res.ops[i]
		errs += res.errs[i]
	}
	st := res.stats
	fmt.Fprintf(out, "total             %10d ops %8d errors (%.0f ops/s); hit rate %.1f%% (L1 %d, L2 %d, misses %d), loads %d, L2 errors %d, evictions %d\n",
		total, errs, float64(total)/cfg.duration.Seconds(), 100*st.HitRate(), st.L1Hits, st.L2Hits, st.Misses, st.Loads, st.L2Errors, st.L1Evictions)
	if lastErr != nil {
		fmt.Fprintf(out, "last error: %v\n", lastErr)
	}
	if res.busySamples > 0 {
		fmt.Fprintf(out, "%d of %d samples taken with operations still running after %v\n", res.busySamples, len(res.samples), maxPause)
	}
	if cfg.redisAddr != "" {
		fmt.Fprintf(out, "cleanup: %d keys unlinked, %d left\n", res.keysRemoved, res.keysLeft)
	}
	if ok {
		gr := func(ss []sample) string {
			lo := slices.MinFunc(ss, func(a, b sample) int { return a.goroutines - b.goroutines }).goroutines
			hi := slices.MaxFunc(ss, func(a, b sample) int { return a.goroutines - b.goroutines }).goroutines
			return fmt.Sprintf("%d-%d", lo, hi)
		}
		w, e := medianHeap(warm), medianHeap(end)
		fmt.Fprintf(out, "heap (median, after GC): first %v %s, last %v %s: %+.1f%% (limit +%.0f%% or 1 MiB); HeapInuse %s -> %s\n",
			cfg.window, mib(w), cfg.window, mib(e), 100*(float64(e)-float64(w))/float64(w), 100*cfg.maxGrowth, mib(medianInuse(warm)), mib(medianInuse(end)))
		fmt.Fprintf(out, "goroutines: %d before the cache, %s in the first %v, %s in the last %v, %d after Close\n",
			res.goroutinesBefore, gr(warm), cfg.window, gr(end), cfg.window, res.goroutinesAfter)
	}
	if len(res.failures) == 0 {
		fmt.Fprintln(out, "PASS: heap flat, no goroutine leaked")
		return
	}
	for _, f := range res.failures {
		fmt.Fprintln(out, "FAIL:", f)
	}
}

// ownGoroutines counts the process's goroutines, less those of an in-process Redis.
func (cfg config) ownGoroutines() int {
	n := runtime.NumGoroutine()
	if cfg.serverGoroutines != nil {
		n -= cfg.serverGoroutines()
	}
	return n
}

// settledGoroutines waits up to limit for the goroutine count to come down to want (a closed
// connection's reader, on either side, exits a moment after the Close) and returns the count.
func settledGoroutines(want int, limit time.Duration) int {
	deadline := time.Now().Add(limit)
	for {
		n := runtime.NumGoroutine()
		if n <= want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// cleanup unlinks every key of the namespace, walking it with SCAN, and counts what a second walk
// still finds.
func cleanup(ctx context.Context, rdb *redis.Client, ns string) (removed, left int, err error) {
	match := ns + ":*"
	var cursor uint64
	for {
		keys, next, err := rdb.Scan(ctx, cursor, match, 1000).Result()
		if err != nil {
			return removed, 0, err
		}
		if len(keys) > 0 {
			n, err := rdb.Unlink(ctx, keys...).Result()
			if err != nil {
				return removed, 0, err
			}
			removed += int(n)
		}
		if cursor = next; cursor == 0 {
			break
		}
	}
	iter := rdb.Scan(ctx, 0, match, 1000).Iterator()
	for iter.Next(ctx) {
		left++
	}
	return removed, left, iter.Err()
}

func redisVersion(ctx context.Context, rdb *redis.Client) string {
	info, err := rdb.Info(ctx, "server").Result()
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "redis_version:"); ok {
			return v
		}
	}
	return ""
}

func mib(b uint64) string { return fmt.Sprintf("%.2f MiB", float64(b)/(1<<20)) }
