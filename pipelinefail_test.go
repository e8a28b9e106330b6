package imgcache

import (
	"context"
	"errors"
	"slices"
	"testing"

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
			polls := f.add("get", w.b.leaseKey(ks[1]))
			var l countingBatchLoader
			var found []bool
			var err error
			done := make(chan struct{})
			go func() {
				defer close(done)
				_, found, err = w.b.GetOrLoadMany(ctx, ks, l.load)
			}()
			eventually(t, func() error {
				if f.seen(polls) == 0 {
					return errors.New("the batch has not polled the leases yet")
				}
				return nil
			})
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
			<-done
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
