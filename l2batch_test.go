package imgcache

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// readGate (a beforeCall hook: hold) holds Redis reads of a test's keys (a GET, an MGET, or a pipeline of GETs) until
// released, and records the keys of every read it lets through. Reads of one or two keys (one
// Get's value and generation) wait on solo; larger ones (a batch) on batch.
type readGate struct {
	watch map[string]bool // the Redis keys whose reads are held
	solo  chan struct{}
	batch chan struct{}
	panic bool // a batch panics instead of waiting

	mu   sync.Mutex
	held int        // reads waiting now
	sent [][]string // keys of each read let through, in order
}

func newReadGate(keys ...string) *readGate {
	g := &readGate{watch: map[string]bool{}, solo: make(chan struct{}), batch: make(chan struct{})}
	for _, k := range keys {
		g.watch[k] = true
	}
	return g
}

func (g *readGate) hold(cmds []redis.Cmder) {
	var keys []string
	for _, c := range cmds {
		if name := c.Name(); name != "get" && name != "mget" {
			return
		}
		for _, a := range c.Args()[1:] {
			keys = append(keys, fmt.Sprint(a))
		}
	}
	if !slices.ContainsFunc(keys, func(k string) bool { return g.watch[k] }) {
		return
	}
	wait := g.solo
	if len(keys) > 2 {
		if g.panic {
			panic("hook panics on a batch")
		}
		wait = g.batch
	}
	g.mu.Lock()
	g.held++
	g.mu.Unlock()
	<-wait
	g.mu.Lock()
	g.held--
	g.sent = append(g.sent, keys)
	g.mu.Unlock()
}

func (g *readGate) waitHeld(t *testing.T, n int) {
	t.Helper()
	waitFor(t, func() bool { g.mu.Lock(); defer g.mu.Unlock(); return g.held == n })
}

func (g *readGate) rounds() [][]string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.sent)
}

// waitQueued waits until n reads are queued for a batch.
func waitQueued(t *testing.T, l *l2, n int) {
	t.Helper()
	waitFor(t, func() bool { l.reads.mu.Lock(); defer l.reads.mu.Unlock(); return len(l.reads.queue) == n })
}

// batchFixture stores n ImageMeta values through one cache and returns a second, L1-less cache on
// client (the same Redis) that reads them, with a gate on client's reads of them.
func batchFixture(t *testing.T, e *testEnv, client redis.UniversalClient, n int) (*Cache[ImageMeta], []Key, *readGate) {
	t.Helper()
	w := newCache[ImageMeta](e, e.opts())
	keys := make([]Key, n)
	var rkeys []string
	for i := range keys {
		keys[i] = NewKey("artist", fmt.Sprint(i)).With("size", "64")
		if err := w.Set(ctx, keys[i], sampleMeta(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
		rkeys = append(rkeys, e.redisKey(keys[i]))
	}
	o := e.opts()
	o.Redis, o.L1Size = client, -1
	r := newCache[ImageMeta](e, o)
	g := newReadGate(rkeys...)
	client.AddHook(beforeCall(g.hold))
	return r, keys, g
}

// With readsInFlight reads under way, the reads that come meanwhile wait for one of them to end
// and then go together in one round trip; each still gets its own value.
func TestConcurrentReadsShareARoundTrip(t *testing.T) {
	t.Run("node", func(t *testing.T) {
		e := newEnv(t) // the Cluster in the cluster run: a pipeline split by node
		testReadsShareARoundTrip(t, e, e.rdb)
	})
	t.Run("ring", func(t *testing.T) {
		e := newNodeEnv(t)
		ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": e.node().Options().Addr}, ContextTimeoutEnabled: true})
		t.Cleanup(func() { _ = ring.Close() })
		testReadsShareARoundTrip(t, e, ring)
	})
}

func testReadsShareARoundTrip(t *testing.T, e *testEnv, client redis.UniversalClient) {
	const queued = 20
	c, keys, g := batchFixture(t, e, client, readsInFlight+queued)
	got := make([]ImageMeta, len(keys))
	errs := make([]error, len(keys))
	var wg sync.WaitGroup
	get := func(i int) {
		wg.Go(func() { got[i], errs[i] = c.Get(ctx, keys[i]) })
	}
	for i := range readsInFlight {
		get(i)
	}
	g.waitHeld(t, readsInFlight)
	for i := readsInFlight; i < len(keys); i++ {
		get(i)
	}
	waitQueued(t, c.l2, queued)
	close(g.solo)
	close(g.batch)
	wg.Wait()

	for i := range keys {
		if want := sampleMeta(fmt.Sprint(i)); errs[i] != nil || got[i] != want {
			t.Errorf("Get(%v) = %+v, %v; want %+v", keys[i], got[i], errs[i], want)
		}
	}
	rounds := g.rounds()
	if len(rounds) != readsInFlight+1 {
		t.Fatalf("%d reads made %d round trips %q, want %d alone and one batch", len(keys), len(rounds), rounds, readsInFlight)
	}
	i := slices.IndexFunc(rounds, func(keys []string) bool { return len(keys) > 2 })
	if i < 0 {
		t.Fatalf("round trips %q: no batch", rounds)
	}
	batch := rounds[i] // the held reads may be let through after it
	for _, k := range keys[readsInFlight:] {
		if !slices.Contains(batch, e.redisKey(k)) {
			t.Errorf("the batch %q does not read %s", batch, e.redisKey(k))
		}
	}
	if s := c.Stats(); s.L2Hits != uint64(len(keys)) || s.L2Batched != queued || s.L2Errors != 0 {
		t.Errorf("stats = %+v, want %d L2 hits, %d batched, no errors", s, len(keys), queued)
	}
	if n := c.l2.reads.inflight; n != 0 {
		t.Errorf("%d reads still counted in flight", n)
	}
}

// A queued read gives up when its context ends or when L2Timeout has passed since it queued,
// whatever the reads ahead of it are doing, and leaves the queue.
func TestQueuedReadGivesUp(t *testing.T) {
	e := newNodeEnv(t)
	const timeout = 150 * time.Millisecond
	c, keys, g := batchFixture(t, e, e.rdb, readsInFlight+1)
	c.l2.timeout = timeout // the held reads ignore it: the gate holds them past their deadlines
	var wg sync.WaitGroup
	for i := range readsInFlight {
		wg.Go(func() { _, _ = c.l2.read(ctx, e.redisKey(keys[i]), "") }) // past its deadline when let go
	}
	g.waitHeld(t, readsInFlight)
	rkey := e.redisKey(keys[readsInFlight])

	cctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := c.l2.read(cctx, rkey, ""); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("queued read past its context's deadline: err = %v, want context.DeadlineExceeded", err)
	}
	waitQueued(t, c.l2, 0)

	start := time.Now()
	_, err := c.l2.read(ctx, rkey, "")
	if took := time.Since(start); !errors.Is(err, context.DeadlineExceeded) || took < timeout || took > 20*timeout {
		t.Errorf("queued read without a deadline: err = %v after %v, want context.DeadlineExceeded after L2Timeout (%v)", err, took, timeout)
	}
	waitQueued(t, c.l2, 0)

	close(g.solo)
	wg.Wait()
	if r, err := c.l2.read(ctx, rkey, ""); err != nil || !r.ok[0] {
		t.Errorf("read after the queue drained = %v, %v; want the value", r.ok, err)
	}
	if n := c.l2.reads.inflight; n != 0 {
		t.Errorf("%d reads still counted in flight", n)
	}
	if rounds := g.rounds(); len(rounds) != readsInFlight+1 {
		t.Errorf("round trips %q: the reads that gave up must not have been sent", rounds)
	}
}

// startQueuedReads holds readsInFlight reads at the gate and queues one read per context after
// them, in order; it returns the queued reads' results.
func startQueuedReads(t *testing.T, c *Cache[ImageMeta], e *testEnv, g *readGate, keys []Key, ctxs ...context.Context) (solo *sync.WaitGroup, results []chan error) {
	t.Helper()
	solo = &sync.WaitGroup{}
	for i := range readsInFlight {
		solo.Go(func() { _, _ = c.l2.read(ctx, e.redisKey(keys[i]), "") })
	}
	g.waitHeld(t, readsInFlight)
	for i, rctx := range ctxs {
		res := make(chan error, 1)
		results = append(results, res)
		k := e.redisKey(keys[readsInFlight+i])
		go func() {
			defer func() {
				if p := recover(); p != nil {
					res <- fmt.Errorf("panic: %v", p)
				}
			}()
			r, err := c.l2.read(rctx, k, "")
			if err == nil && !r.ok[0] {
				err = errors.New("value missing")
			}
			res <- err
		}()
		waitQueued(t, c.l2, i+1)
	}
	return solo, results
}

// A read that leaves while its batch is in flight gets its own error at once; the batch goes on
// and answers the others.
func TestBatchMemberLeavesTheBatchGoesOn(t *testing.T) {
	e := newNodeEnv(t)
	c, keys, g := batchFixture(t, e, e.rdb, readsInFlight+3)
	leaving, leave := context.WithCancel(ctx)
	solo, res := startQueuedReads(t, c, e, g, keys, ctx, leaving, ctx)
	close(g.solo)
	solo.Wait()
	g.waitHeld(t, 1) // the batch of the three, sent by the first
	leave()
	if err := <-res[1]; !errors.Is(err, context.Canceled) {
		t.Errorf("the read that left: err = %v, want context.Canceled", err)
	}
	close(g.batch)
	for _, i := range []int{0, 2} {
		if err := <-res[i]; err != nil {
			t.Errorf("queued read %d: %v", i, err)
		}
	}
	if s := c.Stats(); s.L2Batched != 3 {
		t.Errorf("L2Batched = %d, want 3", s.L2Batched)
	}
	if rounds := g.rounds(); len(rounds) != readsInFlight+1 || len(rounds[readsInFlight]) != 3 {
		t.Errorf("round trips %q, want %d alone and one batch of 3", rounds, readsInFlight)
	}
}

// A read chosen to send its batch sends it even if its own caller has left meanwhile: the others
// depend on it.
func TestBatchSenderWhoseCallerLeftStillSends(t *testing.T) {
	e := newNodeEnv(t)
	c, keys, g := batchFixture(t, e, e.rdb, readsInFlight+2)
	leaving, leave := context.WithCancel(ctx)
	solo, res := startQueuedReads(t, c, e, g, keys, leaving, ctx)
	// Hand the batch to the first queued read while its context ends: it gives up, finds itself
	// chosen, and sends. (Should its wait see the hand-off first, it sends and returns its value.)
	b := &c.l2.reads
	b.mu.Lock()
	leave()
	time.Sleep(20 * time.Millisecond) // it now waits for mu in leave
	b.inflight++                      // the place a round trip ending passes on
	lead := b.next()
	b.mu.Unlock()
	lead.ready <- struct{}{}
	close(g.solo)
	close(g.batch)
	solo.Wait()
	if err := <-res[0]; err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("the sender whose caller left: err = %v, want context.Canceled", err)
	}
	if err := <-res[1]; err != nil {
		t.Errorf("the other read: %v", err)
	}
	if n := c.l2.reads.inflight; n != 0 {
		t.Errorf("%d reads still counted in flight", n)
	}
}

// A batch whose sender panics (in a client hook here) answers its other reads with an error at
// once, instead of leaving them to wait for L2Timeout, and frees its place.
func TestBatchSenderPanicAnswersTheOthers(t *testing.T) {
	e := newNodeEnv(t)
	c, keys, g := batchFixture(t, e, e.rdb, readsInFlight+3)
	c.l2.timeout = time.Minute // an unanswered read would hang the test
	g.panic = true
	solo, res := startQueuedReads(t, c, e, g, keys, ctx, ctx, ctx)
	close(g.solo)
	solo.Wait()
	if err := <-res[0]; err == nil || errors.Is(err, errBatchAborted) {
		t.Errorf("the sender: err = %v, want its panic", err)
	}
	for _, i := range []int{1, 2} {
		if err := <-res[i]; !errors.Is(err, errBatchAborted) {
			t.Errorf("queued read %d: err = %v, want errBatchAborted", i, err)
		}
	}
	if n := c.l2.reads.inflight; n != 0 {
		t.Errorf("%d reads still counted in flight", n)
	}
}
