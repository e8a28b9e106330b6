package imgcache

import (
	"context"
	"errors"
	"testing"
	"time"
)

// deleteDuringBatchRead stores k's value (version 1) with a short TTL and lets it go stale (within
// StaleTTL, so that the fail-safe and the soft timeout may serve it). Then a GetOrLoadMany of k
// runs on a second instance with load, and k is deleted after the batch's read of Redis found the
// stale value and before the batch claimed its flight. It returns the batch's answer for k.
func deleteDuringBatchRead(t *testing.T, k Key, soft time.Duration, load func(context.Context, []Key) (map[Key]ImageMeta, error)) (ImageMeta, bool, error) {
	t.Helper()
	e := newNodeEnv(t)
	hold := newHold("mget", "", true) // held after the batch's read of Redis ran
	opts := e.opts()
	opts.StaleTTL = time.Minute
	opts.SoftLoadTimeout = soft
	w := newCache[ImageMeta](e, opts)
	aopts := opts
	aopts.Redis = heldClient(t, e, hold)
	a := newCache[ImageMeta](e, aopts)
	if _, err := w.GetOrLoad(ctx, k, func(context.Context) (ImageMeta, error) { return metaV(k.ID(), 1), nil }, WithTTL(100*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	e.advance(150 * time.Millisecond) // expired: stale in Redis, within StaleTTL
	type result struct {
		v     ImageMeta
		found bool
		err   error
	}
	done := make(chan result, 1)
	go func() {
		vals, found, err := a.GetOrLoadMany(ctx, []Key{k}, load)
		done <- result{vals[0], found[0], err}
	}()
	select {
	case <-hold.held:
	case <-time.After(2 * time.Second):
		t.Fatal("the batch's read of Redis never ran")
	}
	if err := a.Delete(ctx, k); err != nil {
		t.Fatal(err)
	}
	close(hold.release)
	r := <-done
	return r.v, r.found, r.err
}

// TestGetOrLoadManySoftTimeoutSkipsAValueDeletedDuringTheCall: past SoftLoadTimeout a key gets its
// stale value only if it was not invalidated since the call began, here between the batch's read
// of Redis and its claim of the key's flight.
func TestGetOrLoadManySoftTimeoutSkipsAValueDeletedDuringTheCall(t *testing.T) {
	k := NewKey("artist", "predel")
	slow := func(_ context.Context, ks []Key) (map[Key]ImageMeta, error) {
		time.Sleep(200 * time.Millisecond) // past the soft timeout
		return map[Key]ImageMeta{k: metaV(k.ID(), 2)}, nil
	}
	if v, found, err := deleteDuringBatchRead(t, k, 50*time.Millisecond, slow); err == nil && found && v.ETag == metaV(k.ID(), 1).ETag {
		t.Errorf("GetOrLoadMany served the value a Delete during the call removed (%s), past the soft timeout", v.ETag)
	}
}

// TestGetOrLoadManyFailSafeSkipsAValueDeletedDuringTheCall: the fail-safe, as the soft timeout,
// serves no stale value that a Delete between the batch's read and its claim removed.
func TestGetOrLoadManyFailSafeSkipsAValueDeletedDuringTheCall(t *testing.T) {
	failing := func(context.Context, []Key) (map[Key]ImageMeta, error) { return nil, errors.New("database down") }
	k := NewKey("artist", "predelfs")
	if v, found, err := deleteDuringBatchRead(t, k, 0, failing); err == nil && found && v.ETag == metaV(k.ID(), 1).ETag {
		t.Errorf("the fail-safe served the value a Delete during the call removed (%s)", v.ETag)
	}
}

// TestGetOrLoadManySoftTimeoutCountsNoRefreshWhenNothingWasServed: Stats.Refreshes counts the
// background loads a soft timeout leaves running. A batch whose stale key was loaded and answered
// before the soft timeout fired, while another key (no stale value) still waits for another
// instance's lease, serves no stale value and counts no refresh.
func TestGetOrLoadManySoftTimeoutCountsNoRefreshWhenNothingWasServed(t *testing.T) {
	e := newEnv(t)
	opts := e.opts()
	opts.StaleTTL = time.Minute
	opts.SoftLoadTimeout = 100 * time.Millisecond
	c := newCache[ImageMeta](e, opts)
	s, n := NewKey("artist", "rs"), NewKey("artist", "rn")
	if _, _, err := c.GetOrLoadMany(ctx, []Key{s}, (&countingBatchLoader{}).load, WithTTL(100*time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(150 * time.Millisecond)
	e.advance(150 * time.Millisecond) // s is stale
	// Another instance is loading n; it fails 300ms from now (its lease goes, no value).
	if err := e.rdb.Set(ctx, c.leaseKey(n), "other", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(300 * time.Millisecond)
		e.rdb.Del(context.Background(), c.leaseKey(n))
	}()
	before := c.Stats()
	vals, found, err := c.GetOrLoadMany(ctx, []Key{s, n}, (&countingBatchLoader{}).load)
	if err != nil || !found[0] || !found[1] || vals[0].ETag != metaV(s.String(), 1).ETag {
		t.Fatalf("%v %v %v", vals, found, err)
	}
	after := c.Stats()
	if after.StaleServed != before.StaleServed {
		t.Fatalf("StaleServed +%d: s's load should have answered before the soft timeout", after.StaleServed-before.StaleServed)
	}
	if d := after.Refreshes - before.Refreshes; d != 0 {
		t.Errorf("Refreshes +%d with no stale value served and no load left running for a caller who left", d)
	}
}
