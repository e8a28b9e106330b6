package imgcache

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// TestGetOrLoadManyGivesAnotherHoldersLeaseItsTimeWhileItLoads: a batch waiting for two other
// holders' leases (x, y) takes x's lease mid-wait when x's holder fails, and loads x at once.
// While that load runs, y is not polled: y's holder fails too, and a third instance takes y's
// lease and loads it. The batch's wait must not give up on that fresh lease when its own load
// ends: y is loaded once across instances. On miniredis, whose keys expire only when the test
// moves its clock: the third instance's load outlasts LockTTL, and on a real Redis its lease would
// expire under it, which is a second load by design, not the give-up under test.
func TestGetOrLoadManyGivesAnotherHoldersLeaseItsTimeWhileItLoads(t *testing.T) {
	e := newMiniEnv(t)
	opts := e.opts()
	opts.LockTTL = 600 * time.Millisecond
	a := newCache[ImageMeta](e, opts)
	c := newCache[ImageMeta](e, opts)
	ks := coverKeys("giveup", 2)
	x, y := ks[0], ks[1]
	for _, k := range ks {
		if err := e.rdb.Set(ctx, a.leaseKey(k), "holder-"+k.ID(), time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
	}
	la := &countingBatchLoader{delay: 700 * time.Millisecond}
	done := make(chan error, 1)
	go func() {
		_, _, err := a.GetOrLoadMany(ctx, ks, la.load)
		done <- err
	}()
	time.Sleep(100 * time.Millisecond)
	e.rdb.Del(ctx, a.leaseKey(x)) // x's holder failed: a takes x's lease and loads x (700ms)
	eventually(t, func() error {
		if len(la.callsOf()) == 0 {
			return errors.New("a has not started loading x")
		}
		return nil
	})
	time.Sleep(50 * time.Millisecond)
	e.rdb.Del(ctx, a.leaseKey(y)) // y's holder failed too, while a loads x
	time.Sleep(50 * time.Millisecond)
	var cLoads atomic.Int32
	cDone := make(chan error, 1)
	go func() { // c wants y: its lease is free, c takes it and loads y (700ms)
		_, err := c.GetOrLoad(ctx, y, func(context.Context) (ImageMeta, error) {
			cLoads.Add(1)
			time.Sleep(700 * time.Millisecond)
			return metaV(y.String(), 1), nil
		})
		cDone <- err
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := <-cDone; err != nil {
		t.Fatal(err)
	}
	la.mu.Lock()
	aY := la.loads[y]
	la.mu.Unlock()
	if n := aY + int(cLoads.Load()); n != 1 {
		t.Errorf("y loaded %d times across instances (a %d, c %d) with Redis healthy; loader calls of a: %v", n, aY, cLoads.Load(), la.callsOf())
	}
}

// TestGetOrLoadManyReleasesItsOwnBusyLeaseWhenThePollFails: a lease the batch's registration took
// but reads as busy (go-redis retried its SET NX after a lost reply) is released when the wait's
// poll cannot read it and the key loads without it: otherwise it stays in Redis for LockTTL, and
// every other instance's load of the key waits on a lease nobody holds.
func TestGetOrLoadManyReleasesItsOwnBusyLeaseWhenThePollFails(t *testing.T) {
	e := newNodeEnv(t)
	k := coverKeys("ownbusy", 1)[0]
	opts := e.opts()
	opts.LockTTL = 3 * time.Second
	probe := newCache[ImageMeta](e, opts)
	aopts := opts
	aopts.Redis, _, _ = ownBusyLeaseClient(t, e, probe.leaseKey(k))
	a := newCache[ImageMeta](e, aopts)
	_, _, err := a.GetOrLoadMany(ctx, []Key{k}, func(context.Context, []Key) (map[Key]ImageMeta, error) {
		return nil, errors.New("database down")
	})
	if err == nil {
		t.Fatal("the failing load returned no error")
	}
	b := newCache[ImageMeta](e, opts)
	start := time.Now()
	if _, err := b.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV(k.String(), 1), nil }); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("another instance's load of k waited %v on the lease a's batch took and never released", d)
	}
}

// ownBusyLeaseClient returns a client on e's Redis whose first SET of leaseKey takes the lease but
// replies that it is busy (as a SET NX that go-redis retried after a lost reply does), and whose
// first read of the lease fails; and the holds that do each.
func ownBusyLeaseClient(t *testing.T, e *testEnv, leaseKey string) (client *redis.Client, set, poll *holdPipeline) {
	t.Helper()
	set = newHold("set", leaseKey, true)
	set.lie = redis.Nil
	close(set.release)
	poll = newHold("get", leaseKey, true)
	poll.lie = errors.New("i/o timeout")
	close(poll.release)
	client = heldClient(t, e, set)
	client.AddHook(poll)
	return client, set, poll
}

// loadsAfterCloseDuringALeaseWait runs get on a Cache waiting for another holder's lease of a
// key, whose first poll of the lease is held until Close has begun and the lease has gone (its
// holder done, with no value). It returns how many times get's loader (the function it is given)
// ran after Close, and get's error.
func loadsAfterCloseDuringALeaseWait(t *testing.T, name string, get func(c *Cache[ImageMeta], k Key, load func() ImageMeta) error) (int32, error) {
	t.Helper()
	e := newNodeEnv(t)
	k := coverKeys(name, 1)[0]
	opts := e.opts()
	opts.LockTTL = 5 * time.Second
	probe := newCache[ImageMeta](e, opts)
	if err := e.rdb.Set(ctx, probe.leaseKey(k), "other", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	poll := newHold("get", probe.leaseKey(k), false) // the wait's first poll, held before it is sent
	aopts := opts
	aopts.Redis = heldClient(t, e, poll)
	a, err := New[ImageMeta](aopts)
	if err != nil {
		t.Fatal(err)
	}
	var loadsAfterClose atomic.Int32
	closing := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- get(a, k, func() ImageMeta {
			select {
			case <-closing:
				loadsAfterClose.Add(1)
			default:
			}
			return metaV(k.String(), 1)
		})
	}()
	select {
	case <-poll.held:
	case <-time.After(2 * time.Second):
		t.Fatal("the lease was never polled")
	}
	e.rdb.Del(ctx, probe.leaseKey(k))
	close(closing)
	closed := make(chan struct{})
	go func() { defer close(closed); _ = a.Close() }()
	for a.base.Err() == nil {
		time.Sleep(time.Millisecond)
	}
	close(poll.release)
	err = <-done
	<-closed
	return loadsAfterClose.Load(), err
}

// TestGetOrLoadManyLoadsNothingAfterClose: a poll of a lease that was on its way when Close
// cancelled the batch's context finds the lease gone; the rest of the iteration fails at once on
// the cancelled context, and the batch must fail the key with Close's error, not take that for
// "Redis failing" and call its loader after Close.
func TestGetOrLoadManyLoadsNothingAfterClose(t *testing.T) {
	n, err := loadsAfterCloseDuringALeaseWait(t, "closepoll", func(c *Cache[ImageMeta], k Key, load func() ImageMeta) error {
		_, _, err := c.GetOrLoadMany(ctx, []Key{k}, func(context.Context, []Key) (map[Key]ImageMeta, error) {
			return map[Key]ImageMeta{k: load()}, nil
		})
		return err
	})
	if n != 0 {
		t.Errorf("the batch called its loader %d time(s) after Close (GetOrLoadMany: %v)", n, err)
	}
}

// TestGetOrLoadLoadsNothingAfterClose is TestGetOrLoadManyLoadsNothingAfterClose for one key.
func TestGetOrLoadLoadsNothingAfterClose(t *testing.T) {
	n, err := loadsAfterCloseDuringALeaseWait(t, "closepoll1", func(c *Cache[ImageMeta], k Key, load func() ImageMeta) error {
		_, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return load(), nil })
		return err
	})
	if n != 0 {
		t.Errorf("GetOrLoad called its loader %d time(s) after Close (%v)", n, err)
	}
}
