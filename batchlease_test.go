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
)

// countingBatchLoader loads every key it is given at version 1 after delay, counting each key's
// loads and the calls.
type countingBatchLoader struct {
	delay time.Duration
	mu    sync.Mutex
	loads map[Key]int
	calls [][]Key
}

func (l *countingBatchLoader) load(_ context.Context, ks []Key) (map[Key]ImageMeta, error) {
	l.mu.Lock()
	if l.loads == nil {
		l.loads = map[Key]int{}
	}
	for _, k := range ks {
		l.loads[k]++
	}
	l.calls = append(l.calls, slices.Clone(ks))
	l.mu.Unlock()
	time.Sleep(l.delay)
	m := make(map[Key]ImageMeta, len(ks))
	for _, k := range ks {
		m[k] = metaV(k.String(), 1)
	}
	return m, nil
}

func (l *countingBatchLoader) callsOf() [][]Key {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.calls)
}

func coverKeys(prefix string, n int) []Key {
	ks := make([]Key, n)
	for i := range ks {
		ks[i] = NewKey("album", fmt.Sprintf("%s%d", prefix, i)).With("type", "cover")
	}
	return ks
}

// assertNoLeases fails if any of ks's leases is left in Redis.
func assertNoLeases(t *testing.T, e *testEnv, c *Cache[ImageMeta], ks []Key) {
	t.Helper()
	for _, k := range ks {
		if n := e.rdb.Exists(ctx, c.leaseKey(k)).Val(); n != 0 {
			t.Errorf("the lease of %v is still in Redis", k)
		}
	}
}

// TestGetOrLoadManyFleetStampede: 4 instances x 50 goroutines ask GetOrLoadMany for the same 10
// cold keys, whose loads take 100ms. With leases, each key is loaded once across the fleet; with
// LocalLoadsOnly, at most once per instance.
func TestGetOrLoadManyFleetStampede(t *testing.T) {
	for _, distributed := range []bool{true, false} {
		t.Run(fmt.Sprint("distributed=", distributed), func(t *testing.T) {
			e := newEnv(t)
			opts := e.opts()
			opts.LocalLoadsOnly = !distributed
			// The test is of the leases, not of latency: under the race detector, 200 callers'
			// first round trips can take longer than the default L2Timeout, and a registration
			// that times out loads without leases, as it should.
			opts.L2Timeout = 2 * time.Second
			cs := instances(e, 4, opts)
			ks := coverKeys("stampede", 10)
			l := &countingBatchLoader{delay: 100 * time.Millisecond}
			var wg sync.WaitGroup
			var failed atomic.Int64
			start := make(chan struct{})
			for g := range 200 {
				wg.Go(func() {
					<-start
					vals, found, err := cs[g%4].GetOrLoadMany(ctx, ks, l.load)
					if err != nil {
						failed.Add(1)
						return
					}
					for i, k := range ks {
						if !found[i] || vals[i].ETag != metaV(k.String(), 1).ETag {
							failed.Add(1)
							return
						}
					}
				})
			}
			close(start)
			wg.Wait()
			if n := failed.Load(); n != 0 {
				t.Errorf("%d callers failed", n)
			}
			for _, k := range ks {
				n := l.loads[k]
				if distributed && n != 1 {
					t.Errorf("%v loaded %d times across 4 instances, want exactly 1", k, n)
					for i, c := range cs {
						st := c.Stats()
						t.Logf("instance %d: Loads %d, L2Stale %d, L2Errors %d, LockWaits %d, L2Hits %d", i, st.Loads, st.L2Stale, st.L2Errors, st.LockWaits, st.L2Hits)
					}
				}
				if !distributed && (n < 1 || n > 4) {
					t.Errorf("%v loaded %d times, want at most once per instance", k, n)
				}
			}
			if distributed {
				var waits uint64
				for _, c := range cs {
					waits += c.Stats().LockWaits
				}
				// Every instance but the one that loaded a key got it from Redis: by waiting on the
				// lease (LockWaits), or, if its registration came after the value was stored (a
				// machine under load), as a plain hit. At least some waited.
				if waits == 0 || waits > 3*uint64(len(ks)) {
					t.Errorf("LockWaits = %d across instances, want 1 to %d", waits, 3*len(ks))
				}
			}
			assertNoLeases(t, e, cs[0], ks)
		})
	}
}

// TestGetOrLoadManyWaitsForOtherInstancesLeases: a batch whose keys another instance is loading
// loads only the others itself, gets those keys from the other instance's load, and leaves no lease.
func TestGetOrLoadManyWaitsForOtherInstancesLeases(t *testing.T) {
	e := newEnv(t)
	a, b := newCache[ImageMeta](e, e.opts()), newCache[ImageMeta](e, e.opts())
	ks := coverKeys("overlap", 3)
	la := &countingBatchLoader{delay: 150 * time.Millisecond}
	lb := &countingBatchLoader{}
	done := make(chan error, 1)
	go func() {
		_, _, err := a.GetOrLoadMany(ctx, ks[:2], la.load)
		done <- err
	}()
	eventually(t, func() error {
		if len(la.callsOf()) == 0 {
			return errors.New("a's load has not started")
		}
		return nil
	})
	vals, found, err := b.GetOrLoadMany(ctx, ks[1:], lb.load)
	if err != nil || !found[0] || !found[1] || vals[0].ETag != metaV(ks[1].String(), 1).ETag || vals[1].ETag != metaV(ks[2].String(), 1).ETag {
		t.Fatalf("b: %v %v %v", vals, found, err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got, want := lb.callsOf(), [][]Key{{ks[2]}}; !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("b's loader calls: %v, want %v: the key a was loading is waited for", got, want)
	}
	if s := b.Stats(); s.LockWaits != 1 || s.Loads != 1 {
		t.Errorf("b's LockWaits, Loads = %d, %d; want 1, 1", s.LockWaits, s.Loads)
	}
	assertNoLeases(t, e, a, ks)
}

// TestGetOrLoadManyLoadsWhatAFailedHolderDidNotStore: when the instance holding a key's lease fails
// to load it, a batch waiting for that lease takes it and loads the key in its second loader call.
func TestGetOrLoadManyLoadsWhatAFailedHolderDidNotStore(t *testing.T) {
	e := newEnv(t)
	a, b := newCache[ImageMeta](e, e.opts()), newCache[ImageMeta](e, e.opts())
	ks := coverKeys("failed", 2)
	started := make(chan struct{})
	failing := func(context.Context, []Key) (map[Key]ImageMeta, error) {
		close(started)
		time.Sleep(100 * time.Millisecond)
		return nil, errors.New("database down")
	}
	done := make(chan error, 1)
	go func() {
		_, _, err := a.GetOrLoadMany(ctx, ks[:1], failing)
		done <- err
	}()
	<-started
	lb := &countingBatchLoader{}
	vals, found, err := b.GetOrLoadMany(ctx, ks, lb.load)
	if err != nil || !found[0] || !found[1] || vals[0].ETag != metaV(ks[0].String(), 1).ETag {
		t.Fatalf("b: %v %v %v", vals, found, err)
	}
	if err := <-done; err == nil {
		t.Error("a's failing load returned no error")
	}
	if got, want := lb.callsOf(), [][]Key{{ks[1]}, {ks[0]}}; !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("b's loader calls: %v, want %v", got, want)
	}
	assertNoLeases(t, e, a, ks)
}

// TestGetOrLoadManyReleasesLeasesWhenItsLoadFails: a batch's leases go with its failed load, so no
// other instance waits for them.
func TestGetOrLoadManyReleasesLeasesWhenItsLoadFails(t *testing.T) {
	e := newEnv(t)
	c := newCache[ImageMeta](e, e.opts())
	ks := coverKeys("fails", 3)
	_, _, err := c.GetOrLoadMany(ctx, ks, func(context.Context, []Key) (map[Key]ImageMeta, error) {
		for _, k := range ks {
			if n := e.rdb.Exists(ctx, c.leaseKey(k)).Val(); n != 1 {
				return nil, fmt.Errorf("no lease of %v during the load", k)
			}
		}
		return nil, errors.New("database down")
	})
	if err == nil || !strings.Contains(err.Error(), "database down") {
		t.Fatalf("GetOrLoadMany: %v, want the load's error", err)
	}
	assertNoLeases(t, e, c, ks)
}

// TestGetOrLoadManyWaitEndsAtClose: a batch waiting for another holder's lease returns an error when
// its Cache closes, rather than wait out the lease.
func TestGetOrLoadManyWaitEndsAtClose(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.LockTTL = time.Minute
	c, err := New[ImageMeta](opts)
	if err != nil {
		t.Fatal(err)
	}
	k := coverKeys("held", 1)[0]
	if err := e.rdb.Set(ctx, c.leaseKey(k), "someone-else", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, _, err := c.GetOrLoadMany(ctx, []Key{k}, (&countingBatchLoader{}).load)
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	closed := make(chan struct{})
	go func() { _ = c.Close(); close(closed) }()
	select {
	case err := <-done:
		if err == nil {
			t.Error("GetOrLoadMany returned no error at Close")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("GetOrLoadMany still waiting for the lease 2s after Close")
	}
	<-closed
}

// TestGetOrLoadManyLeasesGoAfterADeleteDuringTheLoad: a Delete of one key during a batch's load
// keeps that key's load out of Redis, and every lease of the batch is gone afterwards: the others
// released with their writes, the moved one after its write was taken back.
func TestGetOrLoadManyLeasesGoAfterADeleteDuringTheLoad(t *testing.T) {
	e := newEnv(t)
	c, other := newCache[ImageMeta](e, e.opts()), newCache[ImageMeta](e, e.opts())
	ks := coverKeys("deleted", 3)
	load := func(ctx context.Context, missing []Key) (map[Key]ImageMeta, error) {
		if err := other.Delete(ctx, ks[1]); err != nil {
			return nil, err
		}
		return (&countingBatchLoader{}).load(ctx, missing)
	}
	if _, found, err := c.GetOrLoadMany(ctx, ks, load); err != nil || !found[0] || !found[1] || !found[2] {
		t.Fatalf("GetOrLoadMany: %v, %v", found, err)
	}
	assertNoLeases(t, e, c, ks)
	for i, k := range ks {
		if got := e.raw(k) != ""; got != (i != 1) {
			t.Errorf("%v in Redis: %v, want %v", k, got, i != 1)
		}
	}
}

// A batch that takes, mid-wait, the lease of a key whose holder released it without a value
// (awaitLeases -> acquire) holds that lease idle until its other keys' waits end (up to LockTTL),
// and only then loads the key. Another instance waiting on that lease gives up at its LockTTL
// (or the lease expires under it on a real Redis) and loads the key too: two loads across
// instances with Redis healthy.
func TestGetOrLoadManyLoadsUnderALeaseAsSoonAsItTakesIt(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.LockTTL = 600 * time.Millisecond
	a := newCache[ImageMeta](e, opts)
	b := newCache[ImageMeta](e, opts)
	ks := coverKeys("idle", 2)
	x, y := ks[0], ks[1]
	// Two other instances are loading x and y.
	if err := e.rdb.Set(ctx, a.leaseKey(x), "holder-x", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	if err := e.rdb.Set(ctx, a.leaseKey(y), "holder-y", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	la := &countingBatchLoader{delay: 300 * time.Millisecond}
	done := make(chan error, 1)
	go func() {
		_, _, err := a.GetOrLoadMany(ctx, ks, la.load)
		done <- err
	}()
	time.Sleep(100 * time.Millisecond) // a waits for both leases
	// x's holder failed: its lease goes, with no value. a takes it.
	if err := e.rdb.Del(ctx, a.leaseKey(x)).Err(); err != nil {
		t.Fatal(err)
	}
	eventually(t, func() error {
		if v, _ := e.rdb.Get(ctx, a.leaseKey(x)).Result(); v == "" {
			return errors.New("a has not taken x's lease")
		}
		return nil
	})
	// b wants x now: a holds its lease, so b waits for a's load.
	var bLoads atomic.Int32
	if _, err := b.GetOrLoad(ctx, x, func(context.Context) (ImageMeta, error) {
		bLoads.Add(1)
		return metaV(x.String(), 2), nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	la.mu.Lock()
	aLoads := la.loads[x]
	la.mu.Unlock()
	if n := aLoads + int(bLoads.Load()); n != 1 {
		t.Errorf("x loaded %d times across instances (a %d, b %d), want 1: a held x's lease idle while it waited for y's", n, aLoads, bLoads.Load())
	}
}

// TestGetOrLoadManyWaitChecksTagsOfTheValueItFinds: a batch that waits for another holder's lease
// checks the value it then finds against its tags' current generations: a value whose tag was
// invalidated after it was stored is not served, and the batch loads the key itself.
func TestGetOrLoadManyWaitChecksTagsOfTheValueItFinds(t *testing.T) {
	e := newEnv(t)
	b, w := newCache[ImageMeta](e, e.opts()), newCache[ImageMeta](e, e.opts())
	k := coverKeys("tagged", 1)[0]
	tag := WithTags("album:9")
	if err := e.rdb.Set(ctx, b.leaseKey(k), "holder", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	type result struct {
		v     ImageMeta
		found bool
		err   error
	}
	done := make(chan result, 1)
	lb := &countingBatchLoader{}
	go func() {
		vals, found, err := b.GetOrLoadMany(ctx, []Key{k}, func(ctx context.Context, ks []Key) (map[Key]ImageMeta, error) {
			m, err := lb.load(ctx, ks)
			m[k] = metaV(k.String(), 2)
			return m, err
		}, tag)
		done <- result{vals[0], found[0], err}
	}()
	time.Sleep(50 * time.Millisecond) // b waits for the holder
	// The holder's write lands after an invalidation of its tag, stamped with the tag's old
	// generation (it registered before the invalidation, which found no value to delete).
	if err := w.Set(ctx, k, metaV(k.String(), 1), tag); err != nil {
		t.Fatal(err)
	}
	stored := e.raw(k)
	if err := w.InvalidateTags(ctx, "album:9"); err != nil {
		t.Fatal(err)
	}
	if err := e.rdb.Set(ctx, e.redisKey(k), stored, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	if err := e.rdb.Del(ctx, b.leaseKey(k)).Err(); err != nil { // the holder is done
		t.Fatal(err)
	}
	r := <-done
	if r.err != nil || !r.found || r.v.ETag != metaV(k.String(), 2).ETag {
		t.Errorf("GetOrLoadMany = %s, %v, %v; want its own load (the stored value's tag was invalidated)", r.v.ETag, r.found, r.err)
	}
	if n := len(lb.callsOf()); n != 1 {
		t.Errorf("the loader ran %d times, want 1", n)
	}
}
