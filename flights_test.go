package imgcache

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// A Close that lands while a load's write is in flight (the write landed, a Delete on another
// instance moved the delete epoch during the load) must still let the load take its write back:
// otherwise the value loaded before the Delete stays in Redis after Delete returned.
func TestCloseDuringALoadsWriteStillTakesItBack(t *testing.T) {
	for _, wp := range writePaths[:2] {
		t.Run(wp.name, func(t *testing.T) {
			e := wp.env(t)
			k := NewKey("artist", "closewrite")
			hold := newHold("set", e.redisKey(k), true) // held after the load's SET ran
			opts := e.opts()
			opts.Redis = wp.client(t, e, hold)
			opts.L2Timeout = 5 * time.Second
			loader := newCache[ImageMeta](e, opts)
			deleter := newCache[ImageMeta](e, e.opts())
			release, done := loadDuringDelete(t, loader, deleter, k, "closewrite")
			close(release)
			select {
			case <-hold.held:
			case <-time.After(2 * time.Second):
				t.Fatal("the load's write was never sent")
			}
			closed := make(chan struct{})
			go func() { defer close(closed); _ = loader.Close() }()
			for loader.base.Err() == nil {
				time.Sleep(time.Millisecond)
			}
			close(hold.release)
			<-done
			<-closed
			if raw := e.raw(k); raw != "" {
				v, err := deleter.Get(ctx, k)
				t.Errorf("a value loaded before Delete is in Redis after Delete returned: other instances read %q, %v", v.ETag, err)
			}
		})
	}
}

// Under LoadTimeout, a load that finishes near its timeout writes and verifies under what is left
// of it: the verify (a second round trip on a Cluster or Ring) and the take-back are then skipped,
// and a value loaded before a Delete stays in Redis.
func TestLoadTimeoutDoesNotCutTheWritesVerify(t *testing.T) {
	e := newNodeEnv(t)
	k := NewKey("artist", "ltverify")
	hold := newHold("set", e.redisKey(k), true) // held after the load's SET ran
	opts := e.opts()
	opts.Redis = heldRing(t, e, hold)
	opts.L2Timeout = 5 * time.Second
	opts.LoadTimeout = 400 * time.Millisecond
	loader := newCache[ImageMeta](e, opts)
	deleter := newCache[ImageMeta](e, e.opts())
	release, done := loadDuringDelete(t, loader, deleter, k, "ltverify")
	close(release)
	<-hold.held
	time.Sleep(500 * time.Millisecond) // the load's timeout passes while its write's reply is on its way
	close(hold.release)
	<-done
	if raw := e.raw(k); raw != "" {
		v, err := deleter.Get(ctx, k)
		t.Errorf("a value loaded before Delete is in Redis after Delete returned: other instances read %q, %v", v.ETag, err)
	}
}

// Early refresh: a caller that misses L1 (the value has expired, it is within StaleTTL) while a
// refresh of the key runs joins the refresh; when the refresh fails it must get the stale value,
// as the fail-safe promises, not the load's error.
func TestRefreshJoinerGetsTheStaleValueWhenTheRefreshFails(t *testing.T) {
	for _, withRedis := range []bool{false, true} {
		name := "l1only"
		if withRedis {
			name = "redis"
		}
		t.Run(name, func(t *testing.T) {
			opts := Options{L1Size: 100}
			if withRedis {
				e := newNodeEnv(t)
				opts = e.opts()
			}
			opts.StaleTTL = time.Minute
			opts.EarlyRefresh = 100
			opts.TTLJitter = -1
			c, err := New[ImageMeta](opts)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			k := NewKey("artist", "refreshjoin")
			ttl := WithTTL(300 * time.Millisecond)
			if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
				time.Sleep(20 * time.Millisecond) // a load cost, so that the refresh is all but certain
				return metaV("rj", 1), nil
			}, ttl); err != nil {
				t.Fatal(err)
			}
			refreshing, fail := make(chan struct{}, 1), make(chan struct{})
			// Hits until one starts the early refresh, whose load fails once the value has expired.
			for i := 0; len(refreshing) == 0; i++ {
				if i == 100 {
					t.Fatal("no early refresh started in 100 hits")
				}
				if _, err := c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
					refreshing <- struct{}{}
					<-fail
					return ImageMeta{}, errors.New("database down")
				}, ttl); err != nil {
					t.Fatal(err)
				}
				time.Sleep(time.Millisecond)
			}
			time.Sleep(350 * time.Millisecond) // the value expires: within StaleTTL
			got := make(chan error, 1)
			var v ImageMeta
			go func() {
				var err error
				v, err = c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
					return ImageMeta{}, errors.New("database down")
				}, ttl)
				got <- err
			}()
			time.Sleep(50 * time.Millisecond)
			close(fail)
			if err := <-got; err != nil {
				t.Errorf("GetOrLoad with a stale value at hand (StaleTTL) = %v; want the stale value", err)
			} else {
				t.Logf("got %s", v.ETag)
			}
		})
	}
}

// Stats: every Get or GetOrLoad ends in exactly one of L1 hit, L2 hit, miss or coalesced. An
// early refresh that finds a newer value in Redis is not a lookup, yet it counts an L2 hit.
func TestEarlyRefreshCountsNoLookup(t *testing.T) {
	e := newNodeEnv(t)
	opts := e.opts()
	opts.TTLJitter = -1
	opts.EarlyRefresh = 100
	a := newCache[ImageMeta](e, opts)
	b := newCache[ImageMeta](e, opts)
	k := NewKey("artist", "refreshhit")
	ttl := WithTTL(500 * time.Millisecond)
	slow := func(context.Context) (ImageMeta, error) {
		time.Sleep(50 * time.Millisecond)
		return metaV("rh", 1), nil
	}
	if _, err := a.GetOrLoad(ctx, k, slow, ttl); err != nil { // A loads v1
		t.Fatal(err)
	}
	if _, err := b.GetOrLoad(ctx, k, slow, ttl); err != nil { // B reads v1 from Redis: an L2 hit
		t.Fatal(err)
	}
	// A newer write of k in Redis that leaves B's L1 copy in place: A's own early refresh.
	refreshed := make(chan struct{}, 100)
	for i := 0; len(refreshed) == 0; i++ {
		if i == 200 {
			t.Fatal("A did not refresh in 200 hits")
		}
		if _, err := a.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) {
			refreshed <- struct{}{}
			return metaV("rh", 2), nil
		}, ttl); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	eventually(t, func() error {
		if flightRunning(a, k) {
			return errors.New("A's refresh still running")
		}
		return nil
	})
	b.loadCost.Store(int64(50 * time.Millisecond)) // B's refresh, of a value it read, all but certain
	before := b.Stats()
	calls := uint64(0)
	for i := 0; b.Stats().Refreshes == before.Refreshes; i++ {
		if i == 200 {
			t.Fatal("B did not refresh in 200 hits")
		}
		calls++
		if _, err := b.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("rh", 3), nil }, ttl); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond)
	}
	eventually(t, func() error {
		if flightRunning(b, k) {
			return errors.New("B's refresh still running")
		}
		return nil
	})
	after := b.Stats()
	t.Logf("%d GetOrLoad calls, all L1 hits: L1Hits +%d, L2Hits +%d, Misses +%d, Loads +%d", calls,
		after.L1Hits-before.L1Hits, after.L2Hits-before.L2Hits, after.Misses-before.Misses, after.Loads-before.Loads)
	if lookups := (after.L1Hits - before.L1Hits) + (after.L2Hits - before.L2Hits) + (after.Misses - before.Misses); lookups != calls {
		t.Errorf("%d GetOrLoad calls counted as %d lookups", calls, lookups)
	}
}

// A lease the registration took but reads as busy (its SET was retried after a lost reply, as
// registerMany's comment allows) is never released when the registration's read hits: it blocks
// every instance's load of k for LockTTL.
func TestOwnBusyLeaseIsReleasedOnARegistrationHit(t *testing.T) {
	e := newNodeEnv(t)
	k := NewKey("artist", "ownlease")
	opts := e.opts()
	opts.LockTTL = 3 * time.Second
	probe := newCache[ImageMeta](e, opts)
	hold := newHold("set", probe.leaseKey(k), true)
	hold.lie = redis.Nil // the reply a retried SET NX gets when the first attempt took the lease
	close(hold.release)
	aopts := opts
	aopts.Redis = heldClient(t, e, hold)
	a := newCache[ImageMeta](e, aopts)
	b := newCache[ImageMeta](e, opts)
	// A speculates (goes straight to its registration) after a run of misses.
	for i := range 12 {
		_, _ = a.GetOrLoad(ctx, NewKey("artist", fmt.Sprint("warm", i)), func(context.Context) (ImageMeta, error) { return metaV("w", 1), nil })
	}
	if !a.speculate() {
		t.Fatal("A does not speculate")
	}
	if _, err := b.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("ownlease", 1), nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := a.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("ownlease", 9), nil }); err != nil {
		t.Fatal(err)
	}
	select {
	case <-hold.held:
	default:
		t.Fatal("A's registration took no lease")
	}
	// The release runs after the call (the lease is most likely another holder's): soon.
	eventually(t, func() error {
		if n, _ := e.rdb.Exists(ctx, probe.leaseKey(k)).Result(); n != 0 {
			return errors.New("A's GetOrLoad was answered by Redis, and its lease is still held")
		}
		return nil
	})
	if err := b.Delete(ctx, k); err != nil {
		t.Fatal(err)
	}
	c := newCache[ImageMeta](e, opts)
	start := time.Now()
	_, _ = c.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("ownlease", 2), nil })
	if d := time.Since(start); d > time.Second {
		t.Errorf("a load of k after Delete waited %v on a lease nobody holds", d)
	}
}

func flightRunning(c *Cache[ImageMeta], k Key) bool {
	c.flights.mu.Lock()
	defer c.flights.mu.Unlock()
	_, ok := c.flights.m[k]
	return ok
}

// A lease the registration took but reads as busy may be the flight's own (its SET was retried
// after a lost reply). When the wait's poll of it fails, the flight must let it go as it takes a
// new one: otherwise it waits on itself until LockTTL, and so does every other instance.
func TestGetOrLoadReleasesItsOwnBusyLeaseWhenThePollFails(t *testing.T) {
	e := newNodeEnv(t)
	k := NewKey("artist", "ownpoll")
	opts := e.opts()
	opts.LockTTL = 3 * time.Second
	probe := newCache[ImageMeta](e, opts)
	client, set, poll := ownBusyLeaseClient(t, e, probe.leaseKey(k))
	aopts := opts
	aopts.Redis = client
	a := newCache[ImageMeta](e, aopts)
	start := time.Now()
	_, err := a.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return ImageMeta{}, errors.New("database down") })
	if err == nil {
		t.Fatal("the failing load returned no error")
	}
	for _, h := range []*holdPipeline{set, poll} {
		select {
		case <-h.held:
		default:
			t.Fatalf("the %s of the lease was never sent", h.cmd)
		}
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("A waited %v on the lease its own registration took", d)
	}
	b := newCache[ImageMeta](e, opts)
	start = time.Now()
	if _, err := b.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV("ownpoll", 1), nil }); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("another instance's load of k waited %v on the lease A took and never released", d)
	}
}
