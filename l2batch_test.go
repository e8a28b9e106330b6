package imgcache

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// readGate (a beforeCall hook: hold) holds Redis reads of a test's keys until released, and
// records the keys of every read it lets through. A lone read (a GET, or an MGET or a pipeline of
// a value and its generation) waits on solo, ignoring its deadline, so that it stays in flight; a
// batch (an MGET of anything else) waits on batch or until its context ends.
type readGate struct {
	watch map[string]bool // the Redis keys whose reads are held
	solo  chan struct{}
	batch chan struct{}
	panic bool        // a batch panics instead of waiting
	pass  atomic.Bool // let everything through, unrecorded

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

func (g *readGate) hold(ctx context.Context, cmds []redis.Cmder) {
	if g.pass.Load() {
		return
	}
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
	g.mu.Lock()
	g.held++
	g.mu.Unlock()
	if isBatch(cmds, keys) {
		if g.panic {
			panic("hook panics on a batch")
		}
		select {
		case <-g.batch:
		case <-ctx.Done():
		}
	} else {
		<-g.solo
	}
	g.mu.Lock()
	g.held--
	g.sent = append(g.sent, keys)
	g.mu.Unlock()
}

// isBatch tells a batch from a lone read's GET, or MGET of a value and its generation.
func isBatch(cmds []redis.Cmder, keys []string) bool {
	return len(cmds) == 1 && cmds[0].Name() == "mget" && (len(keys) != 2 || !strings.Contains(keys[1], ":%g:"))
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
// and then go together in one MGET; each still gets its own value.
func TestConcurrentReadsShareARoundTrip(t *testing.T) {
	const queued = 20
	e := newNodeEnv(t)
	c, keys, g := batchFixture(t, e, e.rdb, readsInFlight+queued)
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

// A batch of reads of one key and reads of a value with its generation answers each read what a
// read of its own would.
func TestBatchOfMixedReadsAnswersEachItsOwn(t *testing.T) {
	e := newNodeEnv(t)
	const queued = 9
	c, keys, g := batchFixture(t, e, e.rdb, readsInFlight+queued)
	type read struct{ key, genKey string }
	reads := make([]read, queued)
	want := make([]readReply, queued)
	g.pass.Store(true)
	for i := range reads {
		k := keys[readsInFlight+i]
		reads[i].key = e.redisKey(k)
		switch i % 3 {
		case 1:
			reads[i].genKey = c.l2.entityGenOf(k)
		case 2:
			reads[i].key += "-absent"
		}
		var err error
		if want[i], err = c.l2.readAlone(ctx, reads[i].key, reads[i].genKey); err != nil {
			t.Fatal(err)
		}
	}
	if !want[0].ok[0] || !want[1].ok[1] || want[2].ok[0] {
		t.Fatalf("fixture: replies %+v, want a value, a generation and an absent key", want[:3])
	}
	g.pass.Store(false)

	var solo, wg sync.WaitGroup
	for i := range readsInFlight {
		solo.Go(func() { _, _ = c.l2.read(ctx, e.redisKey(keys[i]), "") })
	}
	g.waitHeld(t, readsInFlight)
	got := make([]readReply, queued)
	errs := make([]error, queued)
	for i, r := range reads {
		wg.Go(func() { got[i], errs[i] = c.l2.read(ctx, r.key, r.genKey) })
		waitQueued(t, c.l2, i+1)
	}
	close(g.solo)
	close(g.batch)
	solo.Wait()
	wg.Wait()
	for i := range reads {
		if errs[i] != nil || got[i] != want[i] {
			t.Errorf("read %d %+v = %+v, %v; want %+v", i, reads[i], got[i], errs[i], want[i])
		}
	}
	if s := c.Stats(); s.L2Batched != queued {
		t.Errorf("L2Batched = %d, want %d", s.L2Batched, queued)
	}
}

// A Cluster's or a Ring's reads go to several nodes: each goes alone, none waits for another.
func TestClusterAndRingReadsAreNotBatched(t *testing.T) {
	var client redis.UniversalClient
	e := newEnv(t)
	if _, single := e.rdb.(*redis.Client); single {
		ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": e.node().Options().Addr}, ContextTimeoutEnabled: true})
		t.Cleanup(func() { _ = ring.Close() })
		client = ring
	} else {
		client = e.rdb // the Cluster, in the cluster run
	}
	n := readsInFlight + 6
	c, keys, g := batchFixture(t, e, client, n)
	got := make([]ImageMeta, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range keys {
		wg.Go(func() { got[i], errs[i] = c.Get(ctx, keys[i]) })
	}
	g.waitHeld(t, n) // every read is in flight at once
	close(g.solo)
	wg.Wait()
	for i := range keys {
		if want := sampleMeta(fmt.Sprint(i)); errs[i] != nil || got[i] != want {
			t.Errorf("Get(%v) = %+v, %v; want %+v", keys[i], got[i], errs[i], want)
		}
	}
	if s := c.Stats(); s.L2Batched != 0 {
		t.Errorf("L2Batched = %d on a %T, want 0", s.L2Batched, client)
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

// within returns what res carries, or fails the test if nothing comes within d.
func within(t *testing.T, res <-chan error, d time.Duration, what string) error {
	t.Helper()
	select {
	case err := <-res:
		return err
	case <-time.After(d):
		t.Fatalf("%s: no answer within %v", what, d)
		return nil
	}
}

// A read that leaves while its batch is in flight gets its own error at once; the batch goes on
// and answers the others.
func TestBatchMemberLeavesTheBatchGoesOn(t *testing.T) {
	e := newNodeEnv(t)
	c, keys, g := batchFixture(t, e, e.rdb, readsInFlight+3)
	c.l2.timeout = time.Minute
	leaving, leave := context.WithCancel(ctx)
	solo, res := startQueuedReads(t, c, e, g, keys, ctx, leaving, ctx)
	close(g.solo)
	solo.Wait()
	g.waitHeld(t, 1) // the batch of the three
	leave()
	if err := within(t, res[1], 5*time.Second, "the read that left"); !errors.Is(err, context.Canceled) {
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

// The read with the latest deadline sends the batch, under that deadline: the others leave at
// theirs while it is in flight, and no read waits past its own, the sender included.
func TestBatchHonoursEveryReadsDeadline(t *testing.T) {
	e := newNodeEnv(t)
	c, keys, g := batchFixture(t, e, e.rdb, readsInFlight+3)
	c.l2.timeout = time.Minute
	short, cancel := context.WithTimeout(ctx, 30*time.Millisecond)
	defer cancel()
	solo, res := startQueuedReads(t, c, e, g, keys, short, ctx, short)
	close(g.solo)
	solo.Wait()
	for _, i := range []int{0, 2} {
		if err := within(t, res[i], 5*time.Second, "a read with a 30 ms deadline"); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("queued read %d with a 30 ms deadline: err = %v, want context.DeadlineExceeded", i, err)
		}
	}
	close(g.batch)
	if err := within(t, res[1], 5*time.Second, "the sender"); err != nil {
		t.Errorf("the read without a deadline, which sends: %v", err)
	}

	// Every read's deadline is short: the sender gives up with the others, not after L2Timeout.
	c2, keys2, g2 := batchFixture(t, e, e.rdb, readsInFlight+2)
	c2.l2.timeout = time.Minute
	short2, cancel2 := context.WithTimeout(ctx, 30*time.Millisecond)
	defer cancel2()
	solo, res = startQueuedReads(t, c2, e, g2, keys2, short2, short2)
	close(g2.solo)
	solo.Wait()
	for i := range res {
		if err := within(t, res[i], 5*time.Second, "a read with a 30 ms deadline"); err == nil {
			t.Errorf("queued read %d: no error, want its deadline's", i)
		}
	}
	close(g2.batch)
}

// handOffWhileLeaving ends a round trip of reads, handing the queue to its sender, while leave
// ends the sender's context: the sender gives up and finds itself chosen. It returns the sender.
func handOffWhileLeaving(l *l2, leave context.CancelFunc) *pendingRead {
	b := &l.reads
	b.mu.Lock()
	leave()
	time.Sleep(20 * time.Millisecond) // the sender now waits for mu in leave
	b.inflight++                      // the place a round trip ending passes on
	lead := b.next()
	b.mu.Unlock()
	lead.ready <- struct{}{}
	return lead
}

// A read chosen to send its batch sends it even if its own caller has left meanwhile: the others
// depend on it.
func TestBatchSenderWhoseCallerLeftStillSends(t *testing.T) {
	e := newNodeEnv(t)
	c, keys, g := batchFixture(t, e, e.rdb, readsInFlight+2)
	leaving, leave := context.WithCancel(ctx)
	solo, res := startQueuedReads(t, c, e, g, keys, ctx, leaving) // the later deadline sends
	// (Should its wait see the hand-off first, it sends and returns its value.)
	if lead := handOffWhileLeaving(c.l2, leave); lead.ctx != leaving {
		t.Fatal("the batch is not sent by the read with the latest deadline")
	}
	close(g.solo)
	close(g.batch)
	solo.Wait()
	if err := <-res[1]; err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("the sender whose caller left: err = %v, want context.Canceled", err)
	}
	if err := <-res[0]; err != nil {
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
	// The last queued read has the latest deadline: it sends, and panics.
	if err := within(t, res[2], 5*time.Second, "the sender"); err == nil || !strings.HasPrefix(err.Error(), "panic:") {
		t.Errorf("the sender: err = %v, want its panic", err)
	}
	for _, i := range []int{0, 1} {
		if err := within(t, res[i], 5*time.Second, "a read of the batch"); !errors.Is(err, errBatchAborted) {
			t.Errorf("queued read %d: err = %v, want errBatchAborted", i, err)
		}
	}
	if n := c.l2.reads.inflight; n != 0 {
		t.Errorf("%d reads still counted in flight", n)
	}
}

// failGeneration is a client hook that fails the second GET of each two-GET pipeline (a value and
// its generation) after the fact, and answers the pipeline with the first command's error, as a
// Cluster does when the first key is absent and the second key's node failed.
type failGeneration struct{}

func (failGeneration) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (failGeneration) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (failGeneration) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		if len(cmds) == 2 && cmds[1].Name() == "get" {
			cmds[1].SetErr(errors.New("i/o timeout on the generation's node"))
			return cmds[0].Err()
		}
		return err
	}
}

// On a Ring or a Cluster a value and its generation may live on different nodes: a read fails if
// either node fails, even when the other key is absent and the pipeline's error is that key's
// redis.Nil, instead of reading the generation as missing.
func TestReadOfValueAndGenerationFailsWithEitherNode(t *testing.T) {
	e := newNodeEnv(t)
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": e.node().Options().Addr}, ContextTimeoutEnabled: true})
	t.Cleanup(func() { _ = ring.Close() })
	ring.AddHook(failGeneration{})
	o := e.opts()
	o.Redis, o.L1Size = ring, -1
	c := newCache[ImageMeta](e, o)
	key, genKey := c.l2.readKeys(NewKey("artist", "absent"))
	if r, err := c.l2.read(ctx, key, genKey); err == nil {
		t.Errorf("read of an absent value whose generation's node failed = %+v, no error", r)
	}
}

// A read whose Redis call fails counts in L2Errors even when the caller's own deadline, shorter
// than L2Timeout, is what ended it; a read that gave up in the queue, before any call was made for
// it, does not.
func TestL2ErrorsCountFailedCallsNotReadsThatLeftTheQueue(t *testing.T) {
	t.Run("call", func(t *testing.T) {
		e, p := newProxiedEnv(t)
		o := e.opts()
		o.L2Timeout = 500 * time.Millisecond
		c := newCache[ImageMeta](e, o)
		p.setBlackhole(true)
		rctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cancel()
		_, _ = c.Get(rctx, NewKey("artist", "cold"))
		if s := c.Stats(); s.L2Errors != 1 {
			t.Errorf("L2Errors = %d after a read that Redis did not answer, want 1", s.L2Errors)
		}
	})
	t.Run("queue", func(t *testing.T) {
		e := newNodeEnv(t)
		c, keys, g := batchFixture(t, e, e.rdb, readsInFlight+1)
		solo, _ := startQueuedReads(t, c, e, g, keys)
		rctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
		defer cancel()
		if _, err := c.Get(rctx, keys[readsInFlight]); err == nil {
			t.Error("a read queued past its deadline returned no error")
		}
		close(g.solo)
		solo.Wait()
		if s := c.Stats(); s.L2Errors != 0 {
			t.Errorf("L2Errors = %d after a read that left the queue, want 0", s.L2Errors)
		}
	})
}

// A batch that fails fails each read in it, each counted in L2Errors.
func TestFailedBatchFailsEachRead(t *testing.T) {
	e := newMiniEnv(t)
	const queued = 3
	c, keys, g := batchFixture(t, e, e.rdb, readsInFlight+queued)
	errs := make([]error, len(keys))
	var wg sync.WaitGroup
	for i := range readsInFlight {
		wg.Go(func() { _, errs[i] = c.Get(ctx, keys[i]) })
	}
	g.waitHeld(t, readsInFlight)
	for i := readsInFlight; i < len(keys); i++ {
		wg.Go(func() { _, errs[i] = c.Get(ctx, keys[i]) })
		waitQueued(t, c.l2, i-readsInFlight+1)
	}
	e.mr.SetError("ERR injected")
	close(g.solo)
	close(g.batch)
	wg.Wait()
	for i, err := range errs {
		if err == nil {
			t.Errorf("Get %d: no error from a failing Redis", i)
		}
	}
	if s := c.Stats(); s.L2Errors != uint64(len(keys)) || s.L2Batched != queued {
		t.Errorf("L2Errors = %d, L2Batched = %d; want %d and %d", s.L2Errors, s.L2Batched, len(keys), queued)
	}
}

// A read chosen to send a batch of its own, whose caller has left, makes no Redis call and
// returns at once.
func TestBatchForNoOneIsNotSent(t *testing.T) {
	e := newNodeEnv(t)
	c, keys, g := batchFixture(t, e, e.rdb, readsInFlight+1)
	c.l2.timeout = time.Minute
	leaving, leave := context.WithCancel(ctx)
	solo, res := startQueuedReads(t, c, e, g, keys, leaving)
	handOffWhileLeaving(c.l2, leave)
	if err := within(t, res[0], 5*time.Second, "the read whose caller left"); err == nil {
		t.Error("the read whose caller left: no error")
	}
	close(g.solo)
	solo.Wait()
	if rounds := g.rounds(); len(rounds) != readsInFlight {
		t.Errorf("round trips %q: a read was sent for no one", rounds)
	}
	if n := c.l2.reads.inflight; n != 0 {
		t.Errorf("%d reads still counted in flight", n)
	}
}
