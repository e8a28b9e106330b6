package imgcache

import (
	"context"
	"errors"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// A Get on the writing instance that misses L1 while its Set is in flight (the Set's own L1 copy
// was evicted, as it is from a full L1 under churn) reads the old value from Redis and may fill L1
// with it after the Set's invalidation sequence bump. This instance ignores its own bus message, so
// Set drops such a copy after its Redis part, as Delete does.
func TestOwnSetDropsTheOldValueReadDuringIt(t *testing.T) {
	e := newNodeEnv(t)
	k := NewKey("artist", "own-set")
	other := NewKey("artist", "other")
	writer := newCache[ImageMeta](e, e.opts())
	if err := writer.Set(ctx, k, metaV("own-set", 0)); err != nil {
		t.Fatal(err)
	}
	if err := writer.Set(ctx, other, metaV("other", 0)); err != nil {
		t.Fatal(err)
	}
	hold := newHold("set", e.redisKey(k), false) // the Set's SET of the value, before it runs
	opts := e.opts()
	opts.Redis = heldClient(t, e, hold)
	opts.L2Timeout = 5 * time.Second
	opts.L1Size = 1 // a full L1: the next fill evicts the Set's copy
	c := newCache[ImageMeta](e, opts)

	done := make(chan error, 1)
	go func() { done <- c.Set(ctx, k, metaV("own-set", 1)) }()
	<-hold.held
	// The Set has stored v1 in L1 and registered; its SET waits. Churn evicts its copy.
	if _, err := c.Get(ctx, other); err != nil {
		t.Fatal(err)
	}
	if v, err := c.Get(ctx, k); err != nil || v.ETag != metaV("own-set", 0).ETag {
		t.Fatalf("Get during the Set = %q, %v; want the old value from Redis", v.ETag, err)
	}
	close(hold.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if v, err := c.Get(ctx, k); err != nil || v.ETag != metaV("own-set", 1).ETag {
		t.Errorf("Get after its own Set returned = %q, %v; want %q, which Redis holds", v.ETag, err, metaV("own-set", 1).ETag)
	}
}

// failPublish fails PUBLISH, without sending it, while on is set: a connection reset between an
// invalidation's last Redis call and its message.
type failPublish struct{ on atomic.Bool }

func (*failPublish) DialHook(next redis.DialHook) redis.DialHook { return next }
func (f *failPublish) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmd.Name() == "publish" && f.on.Load() {
			err := &net.OpError{Op: "write", Net: "tcp", Err: syscall.ECONNRESET}
			cmd.SetErr(err)
			return err
		}
		return next(ctx, cmd)
	}
}
func (*failPublish) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// An invalidation whose Redis part succeeded but whose PUBLISH failed changed Redis, and the other
// instances still hold (and trust) what it removed. Its message goes to the outbox, which exists
// for exactly this (Redis changed, the others not told): otherwise they would serve the deleted
// value for up to L1TTL though they were never cut off from Redis.
func TestPublishFailureAfterAnInvalidationIsSentLater(t *testing.T) {
	for _, tc := range []struct {
		name       string
		invalidate func(c *Cache[ImageMeta], k Key) error
	}{
		{"delete", func(c *Cache[ImageMeta], k Key) error { return c.Delete(ctx, k) }},
		{"entity", func(c *Cache[ImageMeta], _ Key) error { return c.InvalidateEntity(ctx, "artist", "pub") }},
		{"tags", func(c *Cache[ImageMeta], _ Key) error { return c.InvalidateTags(ctx, "album:pub") }},
		{"pattern", func(c *Cache[ImageMeta], _ Key) error { _, err := c.InvalidatePattern(ctx, "artist:pub"); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newNodeEnv(t)
			fp := &failPublish{}
			rdb := heldClient(t, e, fp)
			ao := e.opts()
			ao.Redis = rdb
			a := newCache[ImageMeta](e, ao)
			b := newCache[ImageMeta](e, e.opts())
			k := NewKey("artist", "pub").With("size", "64")
			if err := b.Set(ctx, k, metaV("pub", 1), WithTags("album:pub")); err != nil {
				t.Fatal(err)
			}
			if err := wantETag(b, k, `"pub-v1"`)(); err != nil {
				t.Fatal(err)
			}
			fp.on.Store(true)
			if err := tc.invalidate(a, k); err != nil {
				t.Fatalf("the invalidation failed: %v", err)
			}
			fp.on.Store(false) // Redis answers PUBLISH again
			if err := wantMiss(a, k)(); err != nil {
				t.Fatalf("the invalidating instance: %v", err)
			}
			eventuallyWithin(t, 2*time.Second, wantMiss(b, k))
		})
	}
}

// gate holds, once it is armed, the first command (alone or in a pipeline) named one of names whose
// first argument is key, after it ran and before the cache sees its reply.
type gate struct {
	names   []string
	key     string
	armed   atomic.Bool
	once    sync.Once
	held    chan struct{}
	release chan struct{}
}

func newGate(key string, names ...string) *gate {
	return &gate{names: names, key: key, held: make(chan struct{}), release: make(chan struct{})}
}

func (g *gate) match(cmds []redis.Cmder) bool {
	if !g.armed.Load() {
		return false
	}
	for _, c := range cmds {
		for _, n := range g.names {
			if c.Name() == n && len(c.Args()) > 1 && c.Args()[1] == g.key {
				return true
			}
		}
	}
	return false
}

func (*gate) DialHook(next redis.DialHook) redis.DialHook { return next }
func (g *gate) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		pipe := g.ProcessPipelineHook(func(ctx context.Context, cmds []redis.Cmder) error { return next(ctx, cmds[0]) })
		return pipe(ctx, []redis.Cmder{cmd})
	}
}
func (g *gate) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		first := false
		if g.match(cmds) {
			g.once.Do(func() { first = true })
		}
		err := next(ctx, cmds)
		if first {
			close(g.held)
			<-g.release
		}
		return err
	}
}

// A load whose write a Delete overtook takes the write back. A Get on the same instance that read
// the write from Redis before the take-back (its stamp is current: a Delete moves no generation)
// must not fill L1 after it: the take-back's bus message (busKeys) reaches only the other
// instances, so the take-back bumps the key's invalidation sequence here before it removes the key.
func TestTakenBackWriteReadOnItsOwnInstanceLeavesL1(t *testing.T) {
	e := newNodeEnv(t)
	k := NewKey("artist", "takeback")
	rkey := e.redisKey(k)
	write := newGate(rkey, "set")        // the load's write pipeline, after it ran
	read := newGate(rkey, "get", "mget") // the Get's read, after its reply came
	rdb := heldClient(t, e, write)
	rdb.AddHook(read)
	ao := e.opts()
	ao.Redis = rdb
	ao.ReadConns = -1
	ao.L2Timeout = 5 * time.Second
	a := newCache[ImageMeta](e, ao)
	b := newCache[ImageMeta](e, e.opts())

	started, release, loaded := make(chan struct{}), make(chan struct{}), make(chan struct{})
	go func() {
		defer close(loaded)
		_, _ = a.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
			close(started)
			<-release
			return metaV("takeback", 1), nil // read from the database before the update below
		})
	}()
	<-started
	if err := b.Delete(ctx, k); err != nil { // the update's Delete
		t.Fatal(err)
	}
	heard(t, a, 1)
	write.armed.Store(true)
	close(release)
	<-write.held // the stale write is in Redis; the verify (in the same pipeline) saw the Delete
	read.armed.Store(true)
	got := make(chan string, 1)
	go func() {
		v, _ := a.Get(ctx, k)
		got <- v.ETag
	}()
	<-read.held // the Get has read the stale write
	close(write.release)
	<-loaded // the write was taken back, and k removed from a's L1
	if v := e.raw(k); v != "" {
		t.Fatal("the stale write is still in Redis: it was not taken back")
	}
	close(read.release)
	<-got // the Get may return what it read, once
	if err := wantMiss(a, k)(); err != nil {
		t.Errorf("after the take-back: %v (the deleted value stays in L1)", err)
	}
	if err := wantMiss(b, k)(); err != nil {
		t.Errorf("the other instance: %v", err)
	}
}

// refuseLater answers, while on is set, every command named name (alone or in a pipeline) with
// ErrBreakerOpen without sending it: what an invalidation's later step gets when the breaker opened
// after its first step changed Redis (which no test can time, as that step's own success closes the
// breaker).
type refuseLater struct {
	name string
	on   atomic.Bool
}

func (*refuseLater) DialHook(next redis.DialHook) redis.DialHook { return next }
func (r *refuseLater) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		pipe := r.ProcessPipelineHook(func(ctx context.Context, cmds []redis.Cmder) error { return next(ctx, cmds[0]) })
		return pipe(ctx, []redis.Cmder{cmd})
	}
}
func (r *refuseLater) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if r.on.Load() && slices.ContainsFunc(cmds, func(c redis.Cmder) bool { return c.Name() == r.name }) {
			for _, c := range cmds {
				c.SetErr(ErrBreakerOpen)
			}
			return ErrBreakerOpen
		}
		return next(ctx, cmds)
	}
}

// An invalidation by entity or tag whose first step moved the generations and whose second (the
// UNLINK of the members) the breaker refused has still made the other instances' copies stale:
// its message must reach them once Redis answers, as for any other failure after a change. Only a
// refusal of its first step changed nothing. (A Delete or InvalidatePattern refused after its first
// step queues its message too, but Redis still holds the values then, so the others read them
// again.)
func TestInvalidationRefusedAfterItsFirstStepIsSentLater(t *testing.T) {
	for _, tc := range []struct {
		name       string
		invalidate func(c *Cache[ImageMeta]) error
	}{
		{"entity", func(c *Cache[ImageMeta]) error { return c.InvalidateEntity(ctx, "artist", "refused") }},
		{"tags", func(c *Cache[ImageMeta]) error { return c.InvalidateTags(ctx, "album:refused") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newNodeEnv(t)
			r := &refuseLater{name: "unlink"}
			ao := e.opts()
			ao.Redis = heldClient(t, e, r)
			a := newCache[ImageMeta](e, ao)
			b := newCache[ImageMeta](e, e.opts())
			k := NewKey("artist", "refused").With("size", "64")
			if err := b.Set(ctx, k, metaV("refused", 1), WithTags("album:refused")); err != nil {
				t.Fatal(err)
			}
			if err := wantETag(b, k, `"refused-v1"`)(); err != nil {
				t.Fatal(err)
			}
			r.on.Store(true)
			if err := tc.invalidate(a); !errors.Is(err, ErrBreakerOpen) {
				t.Fatalf("the invalidation returned %v, want ErrBreakerOpen", err)
			}
			r.on.Store(false) // Redis answers again
			eventuallyWithin(t, 2*time.Second, wantMiss(b, k))
		})
	}
}

// A message queued because Redis failed (here its PUBLISH) is not lost when the instance closes
// before its bus goroutine's next try: Close publishes what is left.
func TestCloseSendsTheQueuedMessages(t *testing.T) {
	e := newNodeEnv(t)
	fp := &failPublish{}
	ao := e.opts()
	ao.Redis = heldClient(t, e, fp)
	a, err := New[ImageMeta](ao)
	if err != nil {
		t.Fatal(err)
	}
	b := newCache[ImageMeta](e, e.opts())
	k := NewKey("artist", "closing")
	if err := b.Set(ctx, k, metaV("closing", 1)); err != nil {
		t.Fatal(err)
	}
	if err := wantETag(b, k, `"closing-v1"`)(); err != nil {
		t.Fatal(err)
	}
	fp.on.Store(true)
	if err := a.Delete(ctx, k); err != nil {
		t.Fatal(err)
	}
	fp.on.Store(false)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	eventuallyWithin(t, 2*time.Second, wantMiss(b, k))
}
