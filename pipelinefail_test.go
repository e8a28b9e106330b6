package imgcache

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// go-redis returns a pipeline's first failed command's error, and that may be an absent key's
// redis.Nil (a GET of a key not there, a SET NX that found the key taken) while a later command,
// on another node, failed. The tests below put such a Nil first.

// A batch load on a Ring whose first write found its key taken (SET NX: redis.Nil) and whose
// second write timed out must not be checked: the check would wait as long, as for a write that
// timed out alone (TestTimedOutWriteIsTakenBackUnchecked).
func TestTimedOutWriteBehindATakenKeyIsTakenBackUnchecked(t *testing.T) {
	e := newNodeEnv(t)
	ks := coverKeys("nilfirst", 2)
	f := &faults{}
	opts := e.opts()
	opts.Redis = heldRing(t, e, f)
	opts.BreakerThreshold = -1
	c := newCache[ImageMeta](e, opts)
	taken := f.add("set", c.l2.key(ks[0]), redis.Nil) // NX found the key taken
	write := f.add("set", c.l2.key(ks[1]), lost{context.DeadlineExceeded})
	checks := []*fault{f.add("hget", c.l2.entityMetaOf(ks[0])), f.add("hget", c.l2.entityMetaOf(ks[1]))}
	var l countingBatchLoader
	if _, found, err := c.GetOrLoadMany(ctx, ks, l.load); err != nil || !found[0] || !found[1] {
		t.Fatalf("GetOrLoadMany = %v, %v; want both values", found, err)
	}
	if f.seen(taken) != 1 || f.seen(write) != 1 {
		t.Fatalf("writes matched %d and %d times, want once each", f.seen(taken), f.seen(write))
	}
	for i, ch := range checks {
		if n := f.seen(ch); n != 0 {
			t.Errorf("the writes were checked after one timed out (%d reads of %v's meta hash)", n, ks[i])
		}
	}
	if n := e.rdb.Exists(ctx, c.l2.key(ks[1])).Val(); n != 0 {
		t.Error("the timed-out write, which landed, is still in Redis")
	}
}

// A batch waiting for leases reads the released keys' values in one round trip. A key released
// without a value (redis.Nil) before one whose read failed must not hide that failure: it is a
// failed Redis call, counted in L2Errors.
func TestWaitReadFailureBehindAnAbsentValueIsCounted(t *testing.T) {
	for _, path := range writePaths[:2] {
		t.Run(path.name, func(t *testing.T) {
			w := newWaitSetup(t, "nilcount", path.env, path.client)
			ks, f := w.ks, w.f
			var l countingBatchLoader
			wait := w.startBatch(t, &l)
			// ks[0]'s holder lets its lease go without a value; ks[1]'s stores one, whose node
			// then fails the read.
			failing := f.add("get", w.b.l2.key(ks[1]), nodeDown)
			if err := w.holder.Set(ctx, ks[1], metaV(ks[1].String(), 1)); err != nil {
				t.Fatal(err)
			}
			// Both leases go at once (one node here), so one read follows for both keys.
			if err := w.e.rdb.Del(ctx, w.b.leaseKey(ks[0]), w.b.leaseKey(ks[1])).Err(); err != nil {
				t.Fatal(err)
			}
			found, err := wait()
			if err != nil || !found[0] || !found[1] {
				t.Fatalf("GetOrLoadMany = %v, %v; want both values", found, err)
			}
			if f.seen(failing) == 0 {
				t.Fatalf("the value of %v was never read after the leases had gone", ks[1])
			}
			if calls := l.callsOf(); len(calls) != 1 || !slices.Equal(calls[0], ks) {
				t.Errorf("loader calls %v; want one of both keys", calls)
			}
			if st := w.b.Stats(); st.L2Errors == 0 {
				t.Error("L2Errors = 0: the failed read of a released key's value was not counted")
			}
		})
	}
}

// racingGen answers, on a one-shard Ring, the GETs of an entity's generation key as a Cluster
// may when the value and the generation live on different nodes: the first read finds the
// generation absent (read before the value's holder registered); in the second, the generation
// is read before change runs (an invalidation and a new value) and the value after it.
type racingGen struct {
	key    string
	read   func() string // the generation key's current value
	change func()
	n      int
}

func (*racingGen) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *racingGen) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		pipe := h.ProcessPipelineHook(func(ctx context.Context, cmds []redis.Cmder) error { return next(ctx, cmds[0]) })
		return pipe(ctx, []redis.Cmder{cmd})
	}
}
func (h *racingGen) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		var gen *redis.StringCmd
		for _, c := range cmds {
			if g, ok := c.(*redis.StringCmd); ok && g.Name() == "get" && g.Args()[1] == h.key {
				gen = g
			}
		}
		if gen == nil {
			return next(ctx, cmds)
		}
		h.n++
		switch h.n {
		case 1:
			err := next(ctx, cmds)
			gen.SetVal("")
			gen.SetErr(redis.Nil)
			return err
		case 2:
			old := h.read()
			h.change()
			err := next(ctx, cmds)
			gen.SetVal(old)
			gen.SetErr(nil)
			return err
		}
		return next(ctx, cmds)
	}
}

// GetMany on a Cluster or a Ring reads again, trusting nothing, a value whose stamp looked stale
// against a generation read with it: that read again is its second look. But the read again
// reads the value again too, with its generation, from two nodes at once: if the value has been
// replaced in between (an invalidation, then a new value), the generation may again be read
// before the new value was written. The new, current value must not then be deleted as stale.
func TestGetManyReadAgainLooksAgainAtAReplacedValue(t *testing.T) {
	e := newNodeEnv(t)
	k := NewKey("artist", "readagain")
	a := newCache[ImageMeta](e, e.opts())
	if err := a.Set(ctx, k, metaV("readagain", 1)); err != nil {
		t.Fatal(err)
	}
	rkey, genKey := a.l2.readKeys(k)
	h := &racingGen{key: genKey,
		read: func() string { return e.rdb.Get(ctx, genKey).Val() },
		change: func() {
			if err := a.InvalidateEntity(ctx, "artist", "readagain"); err != nil {
				t.Error(err)
			}
			if err := a.Set(ctx, k, metaV("readagain", 2)); err != nil {
				t.Error(err)
			}
		}}
	bo := e.opts()
	bo.Redis = heldRing(t, e, h)
	bo.L1Size = -1
	b := newCache[ImageMeta](e, bo)
	vals, found, err := b.GetMany(ctx, []Key{k})
	if h.n < 2 {
		t.Fatalf("the generation was read %d times; want the read and the read again", h.n)
	}
	if st := b.Stats(); st.L2Stale != 0 {
		t.Errorf("L2Stale = %d: the current value was judged stale", st.L2Stale)
	}
	if n := e.rdb.Exists(ctx, rkey).Val(); n != 1 {
		t.Error("the current value was deleted from Redis")
	}
	if err != nil || !found[0] || vals[0].ETag != `"readagain-v2"` {
		t.Errorf("GetMany = %v %s, %v; want the current value", found, vals[0].ETag, err)
	}
}

// leaseReleases counts the round trips (pipelines, or commands alone) that release one of keys
// with releaseLeaseScript.
type leaseReleases struct {
	keys []string
	mu   sync.Mutex
	n    int
}

func (*leaseReleases) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *leaseReleases) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.count([]redis.Cmder{cmd})
		return next(ctx, cmd)
	}
}
func (h *leaseReleases) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.count(cmds)
		return next(ctx, cmds)
	}
}
func (h *leaseReleases) count(cmds []redis.Cmder) {
	for _, c := range cmds {
		args := c.Args()
		if (c.Name() == "evalsha" || c.Name() == "eval") && len(args) > 3 && slices.Contains(h.keys, fmt.Sprint(args[3])) &&
			(args[1] == any(releaseLeaseScript.Hash()) || strings.Contains(fmt.Sprint(args[1]), "redis.call('GET', KEYS[1]) == ARGV[1] then return")) {
			h.mu.Lock()
			h.n++
			h.mu.Unlock()
			return
		}
	}
}

// A batch whose poll of the other holders' leases fails for every key (Redis times out) loads
// them all here, as before the poll read each key's reply, and lets go of the leases it may hold
// in one round trip for all of them, not one each.
func TestLeasePollFailingForEveryKeyReleasesInOneRoundTrip(t *testing.T) {
	e := newNodeEnv(t)
	ks := coverKeys("pollall", 3)
	f := &faults{}
	opts := e.opts()
	ring := heldRing(t, e, f)
	opts.Redis = ring
	opts.BreakerThreshold = -1
	b := newCache[ImageMeta](e, opts)
	rel := &leaseReleases{}
	for _, k := range ks {
		rel.keys = append(rel.keys, b.leaseKey(k))
		if err := e.rdb.Set(ctx, b.leaseKey(k), "holder-"+k.ID(), time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		f.add("get", b.leaseKey(k), lost{context.DeadlineExceeded})
	}
	ring.AddHook(rel)
	var l countingBatchLoader
	if _, found, err := b.GetOrLoadMany(ctx, ks, l.load); err != nil || !found[0] || !found[1] || !found[2] {
		t.Fatalf("GetOrLoadMany = %v, %v; want every value", found, err)
	}
	if calls := l.callsOf(); len(calls) != 1 || len(calls[0]) != len(ks) {
		t.Errorf("loader calls %v; want one, of every key", calls)
	}
	_ = b.Close() // waits for the releases
	if rel.n != 1 {
		t.Errorf("the leases were let go in %d round trips, want 1", rel.n)
	}
}
